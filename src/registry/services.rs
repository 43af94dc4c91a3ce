//! Services: registration with CAS and the service limit, deregistration,
//! TTL heartbeats and the health-filtered catalogue.

use super::*;
use crate::store::Db;

impl Registry {
    /// Registers (or re-registers) a service; returns it with its modify
    /// index. With `cas`, `Some(0)` means "only if new" and `Some(n)` means
    /// "only if its modify index is still n".
    pub async fn register(
        &self,
        input: ServiceInput,
        cas: Option<u64>,
    ) -> Result<(Service, u64), RegistryError> {
        let (service, ttl_ms) = validate_service(input, self.limits.default_ttl_ms)?;
        let limits = self.limits;
        let id = service.id.clone();
        let (service, index, changed) = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let prev = live(tx.get(Kind::Service, &service.id)?);
                    check_cas(&service.id, prev.as_ref(), cas)?;
                    let now = wall_millis();
                    tx.set_service_ttl(&service.id, ttl_ms, now)?;
                    let body = to_body(&service)?;
                    if let Some(p) = prev.as_ref().filter(|p| p.body == body) {
                        // Same registration again (a client restarting):
                        // refresh the TTL, but it is not a change to sync.
                        return Ok((service, p.modify_index, false));
                    }
                    if prev.is_none() {
                        let n = tx.count_live(Kind::Service)?;
                        if n >= limits.max_services {
                            return Err(RegistryError::ServiceLimit {
                                limit: limits.max_services,
                            });
                        }
                    }
                    let rec = commit(
                        tx,
                        Kind::Service,
                        &service.id,
                        Some(&service.name),
                        Some(body),
                    )?;
                    Ok((service, rec.modify_index, true))
                })
            })
            .await??;
        if changed {
            self.notify(Kind::Service, &id, ChangeOp::Upsert);
        }
        Ok((service, index))
    }

    pub async fn deregister(&self, id: String, cas: Option<u64>) -> Result<(), RegistryError> {
        let key = id.clone();
        self.store
            .call(move |db| {
                db.tx(|tx| {
                    let prev = live(tx.get(Kind::Service, &id)?);
                    let Some(prev) = prev else {
                        return Err(RegistryError::NotFound {
                            what: "service",
                            key: id,
                        });
                    };
                    check_cas(&id, Some(&prev), cas)?;
                    tx.set_service_ttl(&id, None, 0)?;
                    commit(tx, Kind::Service, &id, prev.name.as_deref(), None)?;
                    Ok(())
                })
            })
            .await??;
        self.notify(Kind::Service, &key, ChangeOp::Delete);
        Ok(())
    }

    /// Moves a TTL service's deadline; returns the service.
    pub async fn heartbeat(&self, id: String) -> Result<Service, RegistryError> {
        self.store
            .call(move |db| {
                let rec =
                    live(db.get(Kind::Service, &id)?).ok_or_else(|| RegistryError::NotFound {
                        what: "service",
                        key: id.clone(),
                    })?;
                db.touch_service(&id, wall_millis())?;
                Ok(from_body::<Service>(&rec)?)
            })
            .await?
    }

    /// All services; with `include_critical` false, only passing ones.
    pub async fn services(
        &self,
        include_critical: bool,
    ) -> Result<Vec<ServiceEntry>, RegistryError> {
        self.store
            .call(move |db| {
                let now = wall_millis();
                let mut out = Vec::new();
                for rec in db.list(Kind::Service, None)? {
                    let e = entry(db, &rec, now)?;
                    if include_critical || e.health == Health::Passing {
                        out.push(e);
                    }
                }
                Ok(out)
            })
            .await?
    }

    /// A service by id, else the first passing instance with that name.
    pub async fn service(&self, id_or_name: String) -> Result<ServiceEntry, RegistryError> {
        self.store
            .call(move |db| {
                let now = wall_millis();
                if let Some(rec) = live(db.get(Kind::Service, &id_or_name)?) {
                    let e = entry(db, &rec, now)?;
                    if e.health == Health::Passing {
                        return Ok(e);
                    }
                }
                for rec in db.list(Kind::Service, Some(&id_or_name))? {
                    let e = entry(db, &rec, now)?;
                    if e.health == Health::Passing {
                        return Ok(e);
                    }
                }
                Err(RegistryError::NotFound {
                    what: "service",
                    key: id_or_name,
                })
            })
            .await?
    }
}

fn entry(db: &Db, rec: &Record, now: u64) -> Result<ServiceEntry, StoreError> {
    let service: Service = from_body(rec)?;
    let expires_at_ms = db.service_health(&rec.key)?.map(|(_, exp)| exp);
    let health = match expires_at_ms {
        Some(exp) if exp <= now => Health::Critical,
        _ => Health::Passing,
    };
    Ok(ServiceEntry {
        service,
        create_index: rec.create_index,
        modify_index: rec.modify_index,
        expires_at_ms,
        health,
    })
}
