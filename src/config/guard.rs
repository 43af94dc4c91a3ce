//! What a hostile or broken config file cannot do to the loader.
//!
//! A config is a few KB written by a person or an image build; anything
//! else is refused before the YAML parser sees it, with a message that
//! says why:
//! - only regular files are read (a device node such as `/dev/zero` or a
//!   FIFO would never end or never start), and only up to
//!   [`MAX_FILE_SIZE`], read through a cap so a file that grows while it
//!   is read cannot exhaust memory either;
//! - nesting deeper than [`MAX_DEPTH`] is refused by a linear pre-scan: the
//!   parser's own recursion limit only trips after it has tokenised the
//!   whole input, which is quadratic in the depth (200 KB of `[` took 46 s).
//!
//! Messages echo what the file said, so [`escape`] makes control characters
//! visible (`\0`, `\u{1b}`) instead of sending them to a terminal or the
//! journal raw.

use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;

use super::ConfigError;

/// The largest config file or drop-in read. The fullest real config is
/// under 10 KB.
pub(super) const MAX_FILE_SIZE: u64 = 1 << 20;

/// The deepest nesting of sections, lists and flow collections accepted.
/// The schema needs 4 (`acl.users.<name>: [...]`); the pre-scan may count
/// a level or two more than the parser would, hence the margin.
pub(super) const MAX_DEPTH: usize = 32;

/// Reads one config file: a regular file of at most [`MAX_FILE_SIZE`]
/// bytes of UTF-8.
pub(super) fn read(path: &Path) -> Result<String, ConfigError> {
    let refused = |message: String| ConfigError::Refused {
        path: path.to_path_buf(),
        message,
    };
    let read_err = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Checked before opening: opening a FIFO for reading blocks until a
    // writer comes.
    let meta = std::fs::metadata(path).map_err(read_err)?;
    check_meta(&meta).map_err(refused)?;
    let file = std::fs::File::open(path).map_err(read_err)?;
    // And again on what was opened, in case the path changed in between.
    check_meta(&file.metadata().map_err(read_err)?).map_err(refused)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(refused(too_large()));
    }
    String::from_utf8(bytes).map_err(|e| {
        refused(format!(
            "not UTF-8 text (byte {}); a config is YAML text",
            e.utf8_error().valid_up_to()
        ))
    })
}

fn check_meta(meta: &std::fs::Metadata) -> Result<(), String> {
    if !meta.is_file() {
        return Err(
            "not a regular file; config files and drop-ins must be plain files \
             (a device, FIFO or directory is never read)"
                .into(),
        );
    }
    if meta.len() > MAX_FILE_SIZE {
        return Err(too_large());
    }
    Ok(())
}

fn too_large() -> String {
    format!("larger than {MAX_FILE_SIZE} bytes (1Mi), the limit for a config file")
}

/// Refuses nesting deeper than [`MAX_DEPTH`] in one linear pass.
///
/// It counts what can open a level in YAML: an indentation step, each
/// `- ` or `? ` that starts a line's content (`- - x` is two), and `[`/`{`
/// outside quoted scalars and comments. It skips the content of block
/// scalars (`|`, `>`). It may count a level more than the parser (a plain
/// scalar continued on a deeper line), never far fewer.
pub(super) fn check_nesting(text: &str) -> Result<(), String> {
    let too_deep = |line: usize| {
        Err(format!(
            "line {line}: nested deeper than {MAX_DEPTH} levels; a config needs at most 4"
        ))
    };
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut quote: Option<char> = None;
    // The indentation of the line that opened a block scalar.
    let mut block_scalar: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let indent = line.len() - line.trim_start_matches(' ').len();
        let content = &line[indent..];
        if let Some(parent) = block_scalar {
            if content.trim().is_empty() || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        let mut depth = flow;
        let mut rest = content;
        if quote.is_none() && flow == 0 {
            if content.trim().is_empty() || content.starts_with('#') {
                continue;
            }
            while indents.last().is_some_and(|&top| top > indent) {
                indents.pop();
            }
            if indents.last() != Some(&indent) {
                indents.push(indent);
            }
            // Compact block collections: `- - x`, `? - x`.
            loop {
                let t = rest.trim_start_matches(' ');
                let opens = |c: char| {
                    t.strip_prefix(c)
                        .filter(|r| r.is_empty() || r.starts_with(' '))
                };
                match opens('-').or_else(|| opens('?')) {
                    Some(r) => {
                        rest = r;
                        depth += 1;
                        if indents.len() + depth > MAX_DEPTH {
                            return too_deep(line_no);
                        }
                    }
                    None => break,
                }
            }
        }
        let base = if quote.is_none() && flow == 0 {
            indents.len() + depth
        } else {
            indents.len()
        };
        if base > MAX_DEPTH {
            return too_deep(line_no);
        }
        // Scan the rest of the line for flow collections, quotes and a
        // comment. `prev` is the last non-blank character outside quotes:
        // a quote only opens a quoted scalar where a scalar can start.
        let mut prev: Option<char> = None;
        let mut chars = rest.chars().peekable();
        let mut after_blank = true;
        while let Some(c) = chars.next() {
            match quote {
                Some('"') => match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => quote = None,
                    _ => {}
                },
                Some(_) => {
                    if c == '\'' {
                        if chars.peek() == Some(&'\'') {
                            chars.next();
                        } else {
                            quote = None;
                        }
                    }
                }
                None => match c {
                    '#' if after_blank => break,
                    '"' | '\''
                        if matches!(prev, None | Some(':' | '-' | '?' | '[' | '{' | ',')) =>
                    {
                        quote = Some(c)
                    }
                    '[' | '{' => {
                        flow += 1;
                        if indents.len() + flow > MAX_DEPTH {
                            return too_deep(line_no);
                        }
                    }
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            after_blank = c == ' ' || c == '\t';
            if quote.is_none() && !after_blank {
                prev = Some(c);
            }
        }
        if quote.is_none() && flow == 0 && opens_block_scalar(rest) {
            block_scalar = Some(indent);
        }
    }
    Ok(())
}

/// `key: |`, `- >-`, `|2`: the line's content ends in a block scalar
/// header (a comment after it was cut off by the caller's scan, so look
/// for it again here).
fn opens_block_scalar(rest: &str) -> bool {
    let code = match rest.find(" #") {
        Some(i) => &rest[..i],
        None => rest,
    };
    let code = code.trim_end();
    let Some(start) = code.rfind(['|', '>']) else {
        return false;
    };
    let header = &code[start + 1..];
    let before = code[..start].trim_end();
    header
        .chars()
        .all(|c| c == '-' || c == '+' || c.is_ascii_digit())
        && (before.is_empty() || before.ends_with(':') || before.ends_with('-'))
}

/// `text` with control characters (and the invisible bidi overrides) shown
/// as Rust escapes, so a message cannot move the cursor, clear a terminal
/// or hide text.
pub(super) fn escape(text: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(hidden) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if hidden(c) {
            let _ = write!(out, "{}", c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_configs_are_shallow_enough() {
        let ok = "\
mode: edge
acl:
  users:
    app: [\"reader\", 'it''s [fine']
  tokens:
    - name: a
      file: /x   # [[[[ a comment
ota:
  health_commands:
    - |
      [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[
      - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - - -
    - \"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"
mqtt:
  topics: [a, {b: [c]}]
";
        assert_eq!(check_nesting(ok), Ok(()));
    }

    #[test]
    fn deep_nesting_is_refused_early() {
        let deep = format!("a: {}", "[".repeat(100_000));
        let err = check_nesting(&deep).unwrap_err();
        assert!(
            err.contains("line 1") && err.contains("nested deeper"),
            "{err}"
        );
        assert!(check_nesting(&"- ".repeat(MAX_DEPTH + 1)).is_err());
        let indented: String = (0..=MAX_DEPTH)
            .map(|i| format!("{}k:\n", " ".repeat(i)))
            .collect();
        assert!(check_nesting(&indented).is_err());
        // Brackets inside quotes across lines do not count.
        let quoted = format!("a: \"{}\n{}\"\n", "[".repeat(50), "{".repeat(50));
        assert_eq!(check_nesting(&quoted), Ok(()));
    }

    #[test]
    fn control_characters_are_made_visible() {
        assert_eq!(escape("plain `text`"), "plain `text`");
        assert_eq!(
            escape("a\0b\x1b[2J\r\u{202e}"),
            "a\\0b\\u{1b}[2J\\r\\u{202e}"
        );
    }
}
