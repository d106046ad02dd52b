//! The .proto files of a plan's gRPC steps, parsed at compile time (protox, pure Rust, no
//! `protoc` and no code generation) into a descriptor pool; the methods gRPC steps name
//! are looked up there, and their request messages, written as JSON, are checked against
//! the schema before anything runs.
//!
//! Files come only from where data files come from (`DataFiles`): the plan's directory
//! for a local run, the bundle's files for a mesh run; imports resolve the same way, by
//! paths relative to the plan that may not leave its directory. Google's well-known
//! types (`google/protobuf/*.proto`) are built in. This module must not send anything.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use miette::Diagnostic;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, MethodDescriptor};
use protox::file::{File, FileResolver, GoogleFileResolver};

use crate::plan::compile::DataFiles;

/// Largest .proto file read (the plan's own limit).
const MAX_PROTO_BYTES: usize = stampede_protocol::plan::MAX_PLAN_BYTES;
/// Most .proto files read in all, imports included.
const MAX_PROTO_FILES_READ: usize = 256;

/// A proto error: the file and line where known, and one sentence.
#[derive(Debug)]
pub struct ProtoError {
    pub file: Option<String>,
    pub line: Option<usize>,
    pub message: String,
}

/// The plan's compiled .proto files.
#[derive(Debug)]
pub struct Protos {
    pub pool: DescriptorPool,
    /// Every .proto file read from the plan's directory or bundle, imports included, by
    /// the name the plan (or an import) gives: what a mesh run must ship.
    pub files: Vec<String>,
}

/// Whether `name` is a confined relative path: no root, no `..`, `.` or empty parts.
pub fn is_confined(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && !name.contains('\0')
        && name
            .split('/')
            .all(|c| !(c.is_empty() || c == "." || c == ".."))
}

struct Resolver {
    files: Rc<RefCell<BTreeMap<String, String>>>,
    source: Source,
    google: GoogleFileResolver,
}

enum Source {
    Dir(std::path::PathBuf),
    Bundle(BTreeMap<String, Vec<u8>>),
}

impl FileResolver for Resolver {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name.starts_with("google/protobuf/") {
            if let Ok(f) = self.google.open_file(name) {
                return Ok(f);
            }
        }
        if !is_confined(name) {
            return Err(protox::Error::new(format!(
                "\"{name}\" is not a relative path inside the plan's directory"
            )));
        }
        if self.files.borrow().len() >= MAX_PROTO_FILES_READ {
            return Err(protox::Error::new(format!(
                "more than {MAX_PROTO_FILES_READ} .proto files"
            )));
        }
        let bytes = match &self.source {
            Source::Dir(base) => {
                let path = base.join(name);
                match std::fs::metadata(&path) {
                    Ok(m) if m.len() > MAX_PROTO_BYTES as u64 => {
                        return Err(protox::Error::new(format!(
                            "{name} is {} bytes, limit {MAX_PROTO_BYTES}",
                            m.len()
                        )))
                    }
                    Ok(_) => {}
                    Err(_) => return Err(protox::Error::file_not_found(name)),
                }
                std::fs::read(&path).map_err(|e| {
                    protox::Error::new(format!("cannot read {}: {e}", path.display()))
                })?
            }
            Source::Bundle(files) => match files.get(name) {
                Some(b) => b.clone(),
                None => return Err(protox::Error::file_not_found(name)),
            },
        };
        let text = String::from_utf8(bytes)
            .map_err(|_| protox::Error::new(format!("{name} is not UTF-8 text")))?;
        self.files
            .borrow_mut()
            .insert(name.to_string(), text.clone());
        File::from_source(name, &text)
    }
}

/// Parses `names` (and what they import) into one descriptor pool.
pub fn load(names: &[String], files: DataFiles) -> Result<Protos, ProtoError> {
    let read = Rc::new(RefCell::new(BTreeMap::new()));
    let source = match files {
        DataFiles::Dir(base) => Source::Dir(base.to_path_buf()),
        DataFiles::Bundle(shipped) => Source::Bundle(
            shipped
                .iter()
                .filter(|(k, _)| k.ends_with(".proto"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
    };
    let mut compiler = protox::Compiler::with_file_resolver(Resolver {
        files: read.clone(),
        source,
        google: GoogleFileResolver::new(),
    });
    compiler.include_imports(true);
    for name in names {
        if let Err(e) = compiler.open_file(name) {
            return Err(describe(&e, name, &read.borrow()));
        }
    }
    let pool = compiler.descriptor_pool();
    let files = read.borrow().keys().cloned().collect();
    Ok(Protos { pool, files })
}

/// One sentence for a protox error, with the file and the line it points at.
fn describe(e: &protox::Error, opened: &str, sources: &BTreeMap<String, String>) -> ProtoError {
    let file = e.file().map(str::to_string).or(Some(opened.to_string()));
    let offset = e
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|l| l.offset());
    let line = match (&file, offset) {
        (Some(f), Some(at)) => sources
            .get(f)
            .map(|src| src[..at.min(src.len())].matches('\n').count() + 1),
        _ => None,
    };
    let mut message = e.to_string();
    if e.is_file_not_found() && !message.contains("import") {
        message = format!(
            "{message} (a .proto file must be in the plan's directory, or shipped in its bundle)"
        );
    }
    ProtoError {
        file,
        line,
        message: message.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// The method `package.Service/Method` names, or why there is none.
pub fn method(pool: &DescriptorPool, full: &str) -> Result<MethodDescriptor, String> {
    let (service, name) = full
        .split_once('/')
        .ok_or_else(|| format!("\"{full}\" is not package.Service/Method"))?;
    let Some(svc) = pool.get_service_by_name(service) else {
        let known: Vec<String> = pool.services().map(|s| s.full_name().to_string()).collect();
        return Err(format!(
            "no service \"{service}\" in the plan's .proto files (services: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ));
    };
    let Some(m) = svc.methods().find(|m| m.name() == name) else {
        let known: Vec<String> = svc.methods().map(|m| m.name().to_string()).collect();
        return Err(format!(
            "service \"{service}\" has no method \"{name}\" (methods: {})",
            known.join(", ")
        ));
    };
    Ok(m)
}

/// Checks a request message written as JSON against its type: every field must exist, and
/// every value without a template hole must have the field's type. `at` names where the
/// value sits (`message.item.sku`) in the error.
pub fn check_message(
    desc: &MessageDescriptor,
    value: &serde_json::Value,
    at: &str,
) -> Result<(), String> {
    let serde_json::Value::Object(fields) = value else {
        return Err(format!(
            "{at}: a {} message is written as a table",
            desc.full_name()
        ));
    };
    for (key, v) in fields {
        let here = format!("{at}.{key}");
        let field = desc
            .get_field_by_json_name(key)
            .or_else(|| desc.get_field_by_name(key))
            .ok_or_else(|| {
                let names: Vec<String> = desc.fields().map(|f| f.name().to_string()).collect();
                format!(
                    "{here}: message {} has no field \"{key}\" (fields: {})",
                    desc.full_name(),
                    names.join(", ")
                )
            })?;
        if has_hole(v) {
            // Its value is known only per request; a nested message is still walked.
            if let (Kind::Message(m), false, serde_json::Value::Object(_)) =
                (field.kind(), field.is_list() || field.is_map(), v)
            {
                check_message(&m, v, &here)?;
            }
            continue;
        }
        let one = serde_json::json!({ key.clone(): v.clone() });
        DynamicMessage::deserialize(desc.clone(), one).map_err(|e| {
            format!(
                "{here}: does not fit field {} of {}: {e}",
                field.name(),
                desc.full_name()
            )
        })?;
    }
    Ok(())
}

fn has_hole(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains("{{"),
        serde_json::Value::Array(a) => a.iter().any(has_hole),
        serde_json::Value::Object(o) => o.values().any(has_hole),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(src: &str) -> Result<Protos, ProtoError> {
        let mut files = BTreeMap::new();
        files.insert("a.proto".to_string(), src.as_bytes().to_vec());
        load(&["a.proto".into()], DataFiles::Bundle(&files))
    }

    const SHOP: &str = "syntax = \"proto3\";\npackage s;\nservice Inv { rpc Get(Req) returns (Rep); }\nmessage Req { uint64 id = 1; Inner inner = 2; }\nmessage Inner { bool flag = 1; }\nmessage Rep { uint32 n = 1; }\n";

    #[test]
    fn a_malformed_proto_names_file_and_line() {
        let e = pool("syntax = \"proto3\";\n\nmessage A {\n  int32 x = ;\n}\n").unwrap_err();
        assert_eq!(e.file.as_deref(), Some("a.proto"));
        assert_eq!(e.line, Some(4), "{e:?}");
    }

    #[test]
    fn imports_must_stay_inside_the_plan() {
        let e = pool("syntax = \"proto3\";\nimport \"../etc/x.proto\";\n").unwrap_err();
        assert_eq!(
            (e.file.as_deref(), e.line),
            (Some("a.proto"), Some(2)),
            "{e:?}"
        );
        for bad in [
            "../x.proto",
            "/etc/x.proto",
            "a/../../x.proto",
            "./x.proto",
            "",
        ] {
            assert!(!is_confined(bad), "{bad}");
        }
        assert!(is_confined("proto/shop/x.proto"));
        let e = pool("syntax = \"proto3\";\nimport \"missing.proto\";\n").unwrap_err();
        assert!(e.message.contains("missing.proto"), "{e:?}");
    }

    #[test]
    fn methods_are_found_or_named_missing() {
        let p = pool(SHOP).unwrap();
        assert!(method(&p.pool, "s.Inv/Get").is_ok());
        let e = method(&p.pool, "s.Inv/Put").unwrap_err();
        assert!(e.contains("no method \"Put\"") && e.contains("Get"), "{e}");
        let e = method(&p.pool, "s.Nope/Get").unwrap_err();
        assert!(
            e.contains("no service \"s.Nope\"") && e.contains("s.Inv"),
            "{e}"
        );
        assert_eq!(p.files, vec!["a.proto".to_string()]);
    }

    #[test]
    fn messages_are_checked_against_the_schema() {
        let p = pool(SHOP).unwrap();
        let req = p.pool.get_message_by_name("s.Req").unwrap();
        let ok = serde_json::json!({"id": 5, "inner": {"flag": "{{f}}"}});
        check_message(&req, &ok, "message").unwrap();
        let templated = serde_json::json!({"id": "{{id}}"});
        check_message(&req, &templated, "message").unwrap();
        let e = check_message(&req, &serde_json::json!({"idd": 5}), "message").unwrap_err();
        assert!(e.contains("message.idd") && e.contains("no field"), "{e}");
        let e = check_message(&req, &serde_json::json!({"id": "x"}), "message").unwrap_err();
        assert!(e.contains("message.id"), "{e}");
        let e =
            check_message(&req, &serde_json::json!({"inner": {"flag": 3}}), "message").unwrap_err();
        assert!(e.contains("message.inner"), "{e}");
    }
}
