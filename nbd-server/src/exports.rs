//! [`Exports`]: the table of names a client may ask for.
//!
//! One [`Export`] (a source plus its canonical name and description) can answer
//! to several names: sa-image serves a snapshot as the default export `""` and
//! under its id. Aliases resolve to the same `Arc<Export>`, so every name sees
//! the same source (and, with `NBD_FLAG_CAN_MULTI_CONN`, the same writes).

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::ExportsError;
use crate::proto::MAX_STRING;
use crate::source::BlockSource;

/// One export: a source, its canonical name and a description for humans.
pub struct Export {
    name: String,
    description: String,
    source: Arc<dyn BlockSource>,
}

impl Export {
    /// An export called `name`, described as `description`.
    pub fn new(
        name: impl Into<String>,
        description: impl Into<String>,
        source: Arc<dyn BlockSource>,
    ) -> Export {
        Export {
            name: name.into(),
            description: description.into(),
            source,
        }
    }

    /// Canonical name (sent as `NBD_INFO_NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Description (sent as `NBD_INFO_DESCRIPTION` and in `NBD_OPT_LIST`).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The served source.
    pub fn source(&self) -> &Arc<dyn BlockSource> {
        &self.source
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.source.size())
            .finish()
    }
}

/// Names to exports. Several names may lead to the same export.
#[derive(Debug, Default)]
pub struct Exports {
    /// Every name in insertion order, for `NBD_OPT_LIST`.
    names: Vec<String>,
    by_name: HashMap<String, Arc<Export>>,
}

/// "that string is a sequence of UTF-8 code points, which is not `NUL`
/// terminated, MUST NOT contain `NUL` characters ... MUST be no longer than
/// 4096 bytes."
fn valid_string(s: &str) -> bool {
    s.len() <= MAX_STRING && !s.contains('\0')
}

impl Exports {
    /// An empty table.
    pub fn new() -> Exports {
        Exports::default()
    }

    /// A table with one export that answers to its own name and to the
    /// default name `""`.
    pub fn single(export: Export) -> Result<Exports, ExportsError> {
        let mut t = Exports::new();
        let name = export.name().to_owned();
        t.add(export)?;
        if !name.is_empty() {
            t.alias("", &name)?;
        }
        Ok(t)
    }

    /// Adds an export under its canonical name.
    pub fn add(&mut self, export: Export) -> Result<Arc<Export>, ExportsError> {
        if !valid_string(export.name()) || !valid_string(export.description()) {
            return Err(ExportsError::InvalidName(export.name().to_owned()));
        }
        let name = export.name().to_owned();
        if self.by_name.contains_key(&name) {
            return Err(ExportsError::Duplicate(name));
        }
        let export = Arc::new(export);
        self.names.push(name.clone());
        self.by_name.insert(name, export.clone());
        Ok(export)
    }

    /// Makes `alias` another name for the export already known as `existing`.
    pub fn alias(&mut self, alias: &str, existing: &str) -> Result<(), ExportsError> {
        if !valid_string(alias) {
            return Err(ExportsError::InvalidName(alias.to_owned()));
        }
        if self.by_name.contains_key(alias) {
            return Err(ExportsError::Duplicate(alias.to_owned()));
        }
        let export = self
            .by_name
            .get(existing)
            .cloned()
            .ok_or_else(|| ExportsError::Unknown(existing.to_owned()))?;
        self.names.push(alias.to_owned());
        self.by_name.insert(alias.to_owned(), export);
        Ok(())
    }

    /// The export a name leads to.
    pub fn get(&self, name: &str) -> Option<&Arc<Export>> {
        self.by_name.get(name)
    }

    /// Every name with its export, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<Export>)> {
        self.names
            .iter()
            .filter_map(|n| self.by_name.get(n).map(|e| (n.as_str(), e)))
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no name is known.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemorySource;

    fn mem() -> Arc<dyn BlockSource> {
        Arc::new(MemorySource::new(4096))
    }

    #[test]
    fn aliases_share_one_export() {
        let t = Exports::single(Export::new("snap-1", "a snapshot", mem())).unwrap();
        let a = t.get("").unwrap();
        let b = t.get("snap-1").unwrap();
        assert!(Arc::ptr_eq(a, b));
        assert_eq!(a.name(), "snap-1");
        assert_eq!(t.iter().map(|(n, _)| n).collect::<Vec<_>>(), ["snap-1", ""]);
    }

    #[test]
    fn duplicates_and_bad_names_are_refused() {
        let mut t = Exports::new();
        t.add(Export::new("a", "", mem())).unwrap();
        assert_eq!(
            t.add(Export::new("a", "", mem())).unwrap_err(),
            ExportsError::Duplicate("a".into())
        );
        assert_eq!(
            t.alias("b", "zzz").unwrap_err(),
            ExportsError::Unknown("zzz".into())
        );
        assert!(t.add(Export::new("x\0y", "", mem())).is_err());
        assert!(t.add(Export::new("x".repeat(5000), "", mem())).is_err());
    }
}
