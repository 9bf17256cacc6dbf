//! REFERENCE.md documents every configuration key of the publisher and the receiver: each field
//! of the YAML structs in src/config.rs and src/receiver_server.rs appears in it.

use std::path::Path;

/// The YAML key names of every `*File` struct in `src` (serde renames honoured).
fn yaml_keys(src: &str) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    let mut current: Option<String> = None;
    let mut rename: Option<String> = None;
    for line in src.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("pub struct ") {
            let name = rest.split([' ', '{']).next().unwrap_or("").to_string();
            current = name.ends_with("File").then_some(name);
            continue;
        }
        if t == "}" {
            current = None;
        }
        let Some(s) = &current else { continue };
        if let Some(r) = t.split("rename = \"").nth(1) {
            rename = r.split('"').next().map(str::to_string);
        }
        if let Some(f) = t.strip_prefix("pub ") {
            if let Some((field, _)) = f.split_once(':') {
                let key = rename.take().unwrap_or_else(|| field.to_string());
                keys.push((s.clone(), key));
            }
        }
    }
    keys
}

#[test]
fn every_configuration_key_is_in_the_reference() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let reference = std::fs::read_to_string(root.join("REFERENCE.md")).unwrap();
    let mut n = 0;
    for file in ["src/config.rs", "src/receiver_server.rs"] {
        let src = std::fs::read_to_string(root.join(file)).unwrap();
        for (s, key) in yaml_keys(&src) {
            n += 1;
            let documented = reference.contains(&format!("`{key}`"))
                || reference.contains(&format!("`{key}."))
                || reference.contains(&format!("`{key},"))
                || reference.contains(&format!(", {key}`"))
                || reference.contains(&format!(".{key}`"))
                || reference.contains(&format!("`{key} "))
                || reference.contains(&format!("{{{key},"))
                || reference.contains(&format!(", {key}}}"))
                || reference.contains(&format!(", {key}: "));
            assert!(documented, "{file}: {s}.{key} is not in REFERENCE.md");
        }
    }
    assert!(n >= 60, "only {n} keys found: the parser lost track");
}
