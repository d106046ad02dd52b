//! The mesh pre-shared key (pnet) and the node's persistent identity.
//!
//! The key file uses the standard libp2p swarm.key format
//! (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits), so keys interoperate with other
//! libp2p tools. This module reads and writes those files; it must never log or print
//! a key — only its fingerprint.

use std::fs;
use std::io::Write;
use std::path::Path;

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use rand::RngCore;

const HEADER: &str = "/key/swarm/psk/1.0.0/";
const ENCODING: &str = "/base16/";

/// Creates a new random key in swarm.key format.
pub fn generate_key_text() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{HEADER}\n{ENCODING}\n{hex}\n")
}

/// Parses swarm.key text; `origin` names the file in errors.
pub fn parse_key(text: &str, origin: &str) -> Result<PreSharedKey, String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let header = lines.next().unwrap_or("");
    if header != HEADER {
        return Err(format!(
            "{origin}: line 1 must be `{HEADER}` (a key from `stampede keygen`), found `{}`",
            clip(header)
        ));
    }
    let enc = lines.next().unwrap_or("");
    if enc != ENCODING {
        return Err(format!(
            "{origin}: line 2 must be `{ENCODING}`, found `{}`",
            clip(enc)
        ));
    }
    let hex = lines.next().unwrap_or("");
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{origin}: line 3 must be 64 hexadecimal digits (32 bytes), found {} characters",
            hex.len()
        ));
    }
    let mut key = [0u8; 32];
    for (i, slot) in key.iter_mut().enumerate() {
        *slot = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16)
            .map_err(|e| format!("{origin}: line 3: {e}"))?;
    }
    Ok(PreSharedKey::new(key))
}

/// Reads a key file.
pub fn read_key_file(path: &Path) -> Result<PreSharedKey, String> {
    let text = fs::read_to_string(path)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    parse_key(&text, &path.display().to_string())
}

/// The fingerprint operators compare to check that nodes share a key.
pub fn fingerprint(key: &PreSharedKey) -> String {
    key.fingerprint().to_string()
}

/// Writes a file readable only by its owner (keys, tokens).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Loads the node identity from `DATA_DIR/identity.key`, creating it on first start.
pub fn load_or_create_identity(data_dir: &Path) -> Result<Keypair, String> {
    let path = data_dir.join("identity.key");
    match fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
            format!(
                "identity file {} is corrupt ({e}); delete it to get a new node id",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = Keypair::generate_ed25519();
            let bytes = kp
                .to_protobuf_encoding()
                .map_err(|e| format!("cannot encode a new identity: {e}"))?;
            write_private(&path, &bytes)
                .map_err(|e| format!("cannot write identity file {}: {e}", path.display()))?;
            Ok(kp)
        }
        Err(e) => Err(format!("cannot read identity file {}: {e}", path.display())),
    }
}

fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_parses_and_fingerprints_match() {
        let text = generate_key_text();
        let a = parse_key(&text, "k").unwrap();
        let b: PreSharedKey = text.parse().unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(
            fingerprint(&a),
            fingerprint(&parse_key(&generate_key_text(), "k").unwrap())
        );
        assert!(!fingerprint(&a).contains(text.lines().nth(2).unwrap()));
    }

    #[test]
    fn bad_keys_name_the_line() {
        assert!(parse_key("nope", "f").unwrap_err().contains("line 1"));
        assert!(parse_key("/key/swarm/psk/1.0.0/\n/base64/\nxx", "f")
            .unwrap_err()
            .contains("line 2"));
        assert!(parse_key("/key/swarm/psk/1.0.0/\n/base16/\nzz", "f")
            .unwrap_err()
            .contains("line 3"));
    }

    #[test]
    fn identity_persists() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_identity(dir.path()).unwrap();
        let b = load_or_create_identity(dir.path()).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
