//! KV entries: single and batch writes and deletes with Konsul's CAS rules.

use super::validate::validate_key;
use super::*;

impl Registry {
    pub async fn kv_get(&self, key: String) -> Result<KvEntry, RegistryError> {
        self.store
            .call(move |db| {
                let rec = live(db.get(Kind::Kv, &key)?)
                    .ok_or(RegistryError::NotFound { what: "key", key })?;
                kv_entry(&rec)
            })
            .await?
    }

    /// Several keys in one store job (one read transaction), as Konsul's
    /// `/batch/kv/get` promises: (found, not found), in request order.
    pub async fn kv_get_many(
        &self,
        keys: Vec<String>,
    ) -> Result<(Vec<KvEntry>, Vec<String>), RegistryError> {
        if keys.len() > MAX_BATCH {
            return Err(invalid(
                "keys",
                format!("{} keys (max {MAX_BATCH})", keys.len()),
            ));
        }
        self.store
            .call(move |db| {
                let mut found = Vec::new();
                let mut missing = Vec::new();
                for key in keys {
                    match live(db.get(Kind::Kv, &key)?) {
                        Some(rec) => found.push(kv_entry(&rec)?),
                        None => missing.push(key),
                    }
                }
                Ok((found, missing))
            })
            .await?
    }

    pub async fn kv_keys(&self) -> Result<Vec<String>, RegistryError> {
        Ok(self.store.call(|db| db.keys(Kind::Kv)).await??)
    }

    /// Sets a key; returns the new modify index. CAS as in [`register`].
    pub async fn kv_put(
        &self,
        key: String,
        value: String,
        flags: u64,
        cas: Option<u64>,
    ) -> Result<u64, RegistryError> {
        validate_key(&key)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(invalid(
                "value",
                format!("{} bytes (max {MAX_VALUE_LEN})", value.len()),
            ));
        }
        let k = key.clone();
        let index = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let prev = live(tx.get(Kind::Kv, &key)?);
                    check_cas(&key, prev.as_ref(), cas)?;
                    let body = to_body(&KvBody { value, flags })?;
                    let rec = commit(tx, Kind::Kv, &key, None, Some(body))?;
                    Ok::<_, RegistryError>(rec.modify_index)
                })
            })
            .await??;
        self.notify(Kind::Kv, &k, ChangeOp::Upsert);
        Ok(index)
    }

    /// Sets many keys in one transaction (one fsync): all or none.
    pub async fn kv_put_many(&self, items: Vec<(String, String)>) -> Result<u64, RegistryError> {
        if items.len() > MAX_BATCH {
            return Err(invalid(
                "items",
                format!("{} items (max {MAX_BATCH})", items.len()),
            ));
        }
        for (key, value) in &items {
            validate_key(key)?;
            if value.len() > MAX_VALUE_LEN {
                return Err(invalid(
                    "value",
                    format!("{key}: {} bytes (max {MAX_VALUE_LEN})", value.len()),
                ));
            }
        }
        let keys: Vec<String> = items.iter().map(|(k, _)| k.clone()).collect();
        let index = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let mut last = 0;
                    for (key, value) in items {
                        let body = to_body(&KvBody { value, flags: 0 })?;
                        last = commit(tx, Kind::Kv, &key, None, Some(body))?.modify_index;
                    }
                    Ok::<_, RegistryError>(last)
                })
            })
            .await??;
        for k in keys {
            self.notify(Kind::Kv, &k, ChangeOp::Upsert);
        }
        Ok(index)
    }

    /// Deletes many keys in one transaction; missing keys are skipped.
    pub async fn kv_delete_many(&self, keys: Vec<String>) -> Result<Vec<String>, RegistryError> {
        if keys.len() > MAX_BATCH {
            return Err(invalid(
                "keys",
                format!("{} keys (max {MAX_BATCH})", keys.len()),
            ));
        }
        for key in &keys {
            validate_key(key)?;
        }
        let deleted = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let mut deleted = Vec::new();
                    for key in keys {
                        if live(tx.get(Kind::Kv, &key)?).is_some() {
                            commit(tx, Kind::Kv, &key, None, None)?;
                            deleted.push(key);
                        }
                    }
                    Ok::<_, RegistryError>(deleted)
                })
            })
            .await??;
        for k in &deleted {
            self.notify(Kind::Kv, k, ChangeOp::Delete);
        }
        Ok(deleted)
    }

    pub async fn kv_delete(&self, key: String, cas: Option<u64>) -> Result<(), RegistryError> {
        validate_key(&key)?;
        let k = key.clone();
        let deleted = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let prev = live(tx.get(Kind::Kv, &key)?);
                    match (prev, cas) {
                        (None, Some(_)) => Err(RegistryError::NotFound { what: "key", key }),
                        // Deleting what is not there is a no-op, as in Konsul.
                        (None, None) => Ok(false),
                        (Some(p), cas) => {
                            check_cas(&key, Some(&p), cas)?;
                            commit(tx, Kind::Kv, &key, None, None)?;
                            Ok(true)
                        }
                    }
                })
            })
            .await??;
        if deleted {
            self.notify(Kind::Kv, &k, ChangeOp::Delete);
        }
        Ok(())
    }
}

fn kv_entry(rec: &Record) -> Result<KvEntry, RegistryError> {
    let body: KvBody = from_body(rec)?;
    Ok(KvEntry {
        key: rec.key.clone(),
        value: body.value,
        flags: body.flags,
        create_index: rec.create_index,
        modify_index: rec.modify_index,
    })
}
