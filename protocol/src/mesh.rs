//! The mesh wire messages: what nodes gossip to each other (announcements) and what
//! they ask each other over request-response. CBOR via ciborium, versioned by
//! [`PROTOCOL_VERSION`].
//!
//! This module only defines shapes and their encoding with size limits; it must not
//! do I/O or keep state. Decoding is defensive: every decoder checks the size first
//! and returns an error instead of panicking on bad bytes.
//!
//! Compatibility rule: the [`Envelope`] header (`protocol_version`, `sender`) never
//! changes shape, so a node can always read another node's protocol version and show
//! it as incompatible instead of silently mixing versions. Bodies may change with the
//! protocol version; unknown map fields are ignored when decoding.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The version of the mesh protocol. Nodes with different versions see each other
/// as `incompatible` and never run together.
pub const PROTOCOL_VERSION: u32 = 5;

/// The largest gossipsub message a node sends or accepts. Must be the same on every
/// node (gossipsub drops larger messages silently), so it is a constant, not a setting.
pub const MAX_GOSSIP_BYTES: usize = 1024 * 1024;

/// The largest request a node accepts over request-response.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// The largest response a node accepts over request-response (plan bundles, large
/// histograms).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Caps on announcement contents, so one peer cannot bloat everyone's view.
pub const MAX_LABELS: usize = 64;
pub const MAX_ADDRS: usize = 32;
pub const MAX_TEXT: usize = 256;
pub const MAX_MEMBERS_IN_RESPONSE: usize = 1024;

/// Why bytes from a peer were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("message is not valid CBOR for {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("message field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Every gossip message: a stable header and a body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub protocol_version: u32,
    /// The sender's peer id (base58), repeated here so the body can be attributed even
    /// when gossipsub relays it.
    pub sender: String,
    pub body: GossipBody,
}

/// An [`Envelope`] as it travels on gossip (since protocol 5): the body's CBOR as a byte
/// string, signed by the sender's identity key (the one its peer id names).
///
/// Gossipsub's own signatures are off (`MessageAuthenticity::Anonymous`): gossipsub
/// verified every copy a node received — each message arrives from up to `mesh_n`
/// neighbours — before dropping duplicates, and ed25519 verification was the largest
/// single cost of a node during a run. This signature is checked once per message, by
/// the receiver, after gossipsub's duplicate filter and before anything reads the body.
/// Gossipsub's message id is a hash of these whole bytes, signature included, so a
/// forged copy has another id than the genuine one and can never shadow it.
///
/// `protocol_version` and `sender` stay top-level map fields, so
/// [`Envelope::decode_header`] still reads them from any version's message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    pub protocol_version: u32,
    /// The signer's peer id (base58).
    pub sender: String,
    /// Distinct for every publication of a sender (its clock in µs at start, then + 1):
    /// the message id is a hash of the bytes, and two publications of the same body
    /// must not be taken for copies of one.
    pub nonce: u64,
    /// The CBOR of the [`GossipBody`].
    #[serde(with = "signature_bytes")]
    pub body: Vec<u8>,
    /// The sender's signature over [`SignedEnvelope::signed_bytes`].
    #[serde(with = "signature_bytes")]
    pub signature: Vec<u8>,
}

impl SignedEnvelope {
    /// The unsigned wire form of `env` (sign [`Self::signed_bytes`], then set `signature`).
    pub fn new(env: &Envelope, nonce: u64) -> Self {
        SignedEnvelope {
            protocol_version: env.protocol_version,
            sender: env.sender.clone(),
            nonce,
            body: to_cbor(&env.body),
            signature: Vec::new(),
        }
    }

    /// What the sender signs: a domain tag, then every field but the signature, each of
    /// fixed length or length-prefixed — built from the bytes received, never from a
    /// re-encoding, so signer and verifier always agree.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48 + self.sender.len() + self.body.len());
        out.extend_from_slice(b"stampede/gossip/1\0");
        out.extend_from_slice(&self.protocol_version.to_be_bytes());
        out.extend_from_slice(&self.nonce.to_be_bytes());
        out.extend_from_slice(&(self.sender.len() as u64).to_be_bytes());
        out.extend_from_slice(self.sender.as_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }

    /// Decodes the wire form (not yet its body: check the signature first, then [`Self::open`]).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let env: SignedEnvelope = from_cbor(bytes, MAX_GOSSIP_BYTES, "a signed gossip envelope")?;
        if env.sender.len() > MAX_TEXT {
            return Err(DecodeError::Invalid {
                field: "sender",
                reason: format!("{} bytes, limit {MAX_TEXT}", env.sender.len()),
            });
        }
        if env.signature.len() > MAX_SIGNATURE {
            return Err(DecodeError::Invalid {
                field: "signature",
                reason: format!("{} bytes, limit {MAX_SIGNATURE}", env.signature.len()),
            });
        }
        Ok(env)
    }

    /// The envelope inside, its body decoded and checked like [`Envelope::decode`]'s.
    pub fn open(&self) -> Result<Envelope, DecodeError> {
        let body: GossipBody = from_cbor(&self.body, MAX_GOSSIP_BYTES, "a gossip body")?;
        validate_body(&body)?;
        Ok(Envelope {
            protocol_version: self.protocol_version,
            sender: self.sender.clone(),
            body,
        })
    }
}

/// The header of an envelope alone, readable whatever the body's version.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EnvelopeHeader {
    pub protocol_version: u32,
    pub sender: String,
}

/// What a gossip message says. New kinds are added here (run proposals, barriers,
/// metric snapshots) — as new variants, never by changing existing ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GossipBody {
    Announce(Announce),
    /// Run coordination (control topic).
    Run(Box<crate::run::RunMessage>),
    /// A node's metrics for one second of a run (metrics topic).
    Snapshot(Box<crate::run::SnapshotMessage>),
    /// The root's merge of one second of a run over its members (metrics topic;
    /// aggregation in a tree, docs/protocol.md §10).
    Batch(Box<crate::run::BatchMessage>),
    /// "My neighbour's record `seq` failed" (membership topic): its subject refutes with
    /// a newer record, or every node counts it lost after the suspicion timeout
    /// (`crate::membership`). Sent only by a neighbour that saw the failure itself.
    Suspect(Suspicion),
}

/// A suspicion of one member's record, sent (and signed: `SignedEnvelope`) by the member
/// that saw it fail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suspicion {
    /// The suspected member's peer id (base58).
    pub subject: String,
    /// The sequence number of the subject's record that failed.
    pub seq: u64,
}

/// What a node is doing, as it tells the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Ready to take part in a run.
    Idle,
    /// Taking part in a run.
    Running,
    /// Shutting down; do not give it work.
    Leaving,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Idle => "idle",
            NodeState::Running => "running",
            NodeState::Leaving => "leaving",
        }
    }
}

/// A node's periodic statement about itself. `addrs` is its listen addresses, so that
/// every node that hears the announcement (relayed by gossipsub) can dial it: that is
/// the address gossip which lets one bootstrap peer introduce the whole mesh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announce {
    pub id: String,
    pub name: String,
    /// The stampede release, e.g. "0.1.0".
    pub version: String,
    pub protocol_version: u32,
    pub labels: BTreeMap<String, String>,
    /// Relative load capacity (worker threads), used to weight execution segments.
    pub capacity: u32,
    pub state: NodeState,
    /// Hosts or CIDRs this node's operator allowed it to send load to.
    pub allow_targets: Vec<String>,
    pub addrs: Vec<String>,
    /// Increases with every announcement of this node's lifetime; lets receivers drop
    /// stale relayed copies. Starts at the node's start time in Unix µs, so it stays
    /// near the clock: receivers refuse one more than [`MAX_SEQ_AHEAD_US`] ahead of theirs.
    pub seq: u64,
    /// The subject's signature (its libp2p identity key, the one its peer id names) over
    /// [`Announce::signed_bytes`]: lets a node pass on another's announcement in a
    /// members list without being able to forge or alter it. Empty from older nodes.
    #[serde(default, with = "signature_bytes")]
    pub signature: Vec<u8>,
}

/// How far ahead of the receiver's clock (µs) an announcement's `seq` may be.
pub const MAX_SEQ_AHEAD_US: u64 = 3600 * 1_000_000;

/// The longest signature accepted (ed25519 signs in 64 bytes; other key types more).
pub const MAX_SIGNATURE: usize = 1024;

mod signature_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::snapshot::serde_bytes_compat::ByteBuf;

    pub fn serialize<S: Serializer>(sig: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(sig)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        Ok(ByteBuf::deserialize(d)?.0)
    }
}

impl Announce {
    /// The bytes its subject signs: the announcement's CBOR with an empty signature
    /// (struct fields in order and sorted maps, so every node computes the same bytes).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.signature = Vec::new();
        to_cbor(&unsigned)
    }

    /// Checks the caps, so a hostile but keyed peer cannot bloat the view.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let text = |field: &'static str, s: &str| {
            if s.len() > MAX_TEXT {
                Err(DecodeError::Invalid {
                    field,
                    reason: format!("{} bytes, limit {MAX_TEXT}", s.len()),
                })
            } else {
                Ok(())
            }
        };
        text("id", &self.id)?;
        text("name", &self.name)?;
        text("version", &self.version)?;
        if self.labels.len() > MAX_LABELS {
            return Err(DecodeError::Invalid {
                field: "labels",
                reason: format!("{} labels, limit {MAX_LABELS}", self.labels.len()),
            });
        }
        for (k, v) in &self.labels {
            text("labels", k)?;
            text("labels", v)?;
        }
        if self.addrs.len() > MAX_ADDRS {
            return Err(DecodeError::Invalid {
                field: "addrs",
                reason: format!("{} addresses, limit {MAX_ADDRS}", self.addrs.len()),
            });
        }
        for a in &self.addrs {
            text("addrs", a)?;
        }
        if self.allow_targets.len() > MAX_LABELS {
            return Err(DecodeError::Invalid {
                field: "allow_targets",
                reason: format!("{} entries, limit {MAX_LABELS}", self.allow_targets.len()),
            });
        }
        for a in &self.allow_targets {
            text("allow_targets", a)?;
        }
        if self.signature.len() > MAX_SIGNATURE {
            return Err(DecodeError::Invalid {
                field: "signature",
                reason: format!("{} bytes, limit {MAX_SIGNATURE}", self.signature.len()),
            });
        }
        if self.capacity > crate::run::MAX_WEIGHT {
            return Err(DecodeError::Invalid {
                field: "capacity",
                reason: format!(
                    "{} worker threads, limit {}",
                    self.capacity,
                    crate::run::MAX_WEIGHT
                ),
            });
        }
        Ok(())
    }
}

/// Requests over request-response (protocol `/stampede/bulk/1`). Add kinds for plan
/// bundles, clock samples and histogram fetches here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MeshRequest {
    /// "Whom do you know?" — asked of every newly connected peer, so a joining node
    /// learns the whole mesh from any one member without waiting for gossip.
    Members,
    /// Run coordination: plan bundles, clock samples, missed snapshots.
    Run(crate::run::RunRequest),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MeshResponse {
    /// The last announcements the responder holds of members it considers alive,
    /// itself included.
    Members {
        protocol_version: u32,
        members: Vec<Announce>,
        /// The records the responder holds lost (subject and seq): a member that finds
        /// itself here refutes, so two sides of a healed partition take each other back.
        #[serde(default)]
        lost: Vec<Suspicion>,
    },
    /// The request was understood but refused, with a reason for the user.
    Refused {
        reason: String,
    },
    Run(crate::run::RunResponse),
}

/// Encodes any wire value to CBOR.
pub fn to_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail for our plain data types.
    if let Err(e) = ciborium::into_writer(value, &mut out) {
        debug_assert!(false, "cbor encoding failed: {e}");
    }
    out
}

/// Decodes CBOR after checking the size limit.
pub fn from_cbor<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    limit: usize,
    what: &'static str,
) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit,
        });
    }
    ciborium::from_reader(bytes).map_err(|e| DecodeError::Malformed {
        what,
        reason: e.to_string(),
    })
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        to_cbor(self)
    }

    /// Decodes a gossip message of this protocol version.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let env: Envelope = from_cbor(bytes, MAX_GOSSIP_BYTES, "a gossip envelope")?;
        validate_body(&env.body)?;
        Ok(env)
    }

    /// Reads only the stable header (for messages of another protocol version).
    pub fn decode_header(bytes: &[u8]) -> Result<EnvelopeHeader, DecodeError> {
        from_cbor(bytes, MAX_GOSSIP_BYTES, "a gossip envelope header")
    }
}

/// The caps every gossip body must meet, whatever carried it.
fn validate_body(body: &GossipBody) -> Result<(), DecodeError> {
    match body {
        GossipBody::Announce(a) => a.validate()?,
        GossipBody::Run(m) => m.validate().map_err(|reason| DecodeError::Invalid {
            field: "run",
            reason,
        })?,
        GossipBody::Snapshot(_) => {}
        GossipBody::Batch(b) => b.validate().map_err(|reason| DecodeError::Invalid {
            field: "batch",
            reason,
        })?,
        GossipBody::Suspect(s) if s.subject.len() > MAX_TEXT => {
            return Err(DecodeError::Invalid {
                field: "subject",
                reason: format!("{} bytes, limit {MAX_TEXT}", s.subject.len()),
            })
        }
        GossipBody::Suspect(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announce() -> Announce {
        Announce {
            id: "12D3KooW".into(),
            name: "n1".into(),
            version: "0.1.0".into(),
            protocol_version: PROTOCOL_VERSION,
            labels: [("region".to_string(), "eu".to_string())].into(),
            capacity: 4,
            state: NodeState::Idle,
            allow_targets: vec!["127.0.0.1".into()],
            addrs: vec!["/ip4/127.0.0.1/tcp/1".into()],
            seq: 7,
            signature: vec![],
        }
    }

    #[test]
    fn envelope_round_trips() {
        let env = Envelope {
            protocol_version: PROTOCOL_VERSION,
            sender: "x".into(),
            body: GossipBody::Announce(announce()),
        };
        let bytes = env.encode();
        assert_eq!(Envelope::decode(&bytes).unwrap(), env);
        let h = Envelope::decode_header(&bytes).unwrap();
        assert_eq!(h.protocol_version, PROTOCOL_VERSION);
        assert_eq!(h.sender, "x");
    }

    #[test]
    fn a_signed_envelope_round_trips_keeps_its_header_readable_and_signs_every_field() {
        let env = Envelope {
            protocol_version: PROTOCOL_VERSION,
            sender: "x".into(),
            body: GossipBody::Announce(announce()),
        };
        let mut signed = SignedEnvelope::new(&env, 41);
        signed.signature = vec![7; 64];
        let bytes = signed.encode();
        let back = SignedEnvelope::decode(&bytes).unwrap();
        assert_eq!(back, signed);
        assert_eq!(back.open().unwrap(), env);
        let h = Envelope::decode_header(&bytes).unwrap();
        assert_eq!(
            (h.protocol_version, h.sender.as_str()),
            (PROTOCOL_VERSION, "x")
        );
        // Whatever a relay changes, the signed bytes change with it.
        let base = signed.signed_bytes();
        let mut other = signed.clone();
        other.sender = "y".into();
        assert_ne!(other.signed_bytes(), base);
        let mut other = signed.clone();
        other.nonce = 42;
        assert_ne!(other.signed_bytes(), base);
        let mut other = signed.clone();
        other.protocol_version += 1;
        assert_ne!(other.signed_bytes(), base);
        let mut other = signed.clone();
        other.body.push(0);
        assert_ne!(other.signed_bytes(), base);
        // The signature is not part of what is signed.
        let mut other = signed.clone();
        other.signature = vec![1; 64];
        assert_eq!(other.signed_bytes(), base);
        // A sender's name and body cannot run into each other: "xy" + body ≠ "x" + "y…".
        let mut a = signed.clone();
        a.sender = "xy".into();
        let mut b = signed.clone();
        b.body.insert(0, b'y');
        assert_ne!(a.signed_bytes(), b.signed_bytes());
    }

    #[test]
    fn a_signed_envelope_with_oversized_fields_or_a_bad_body_is_refused() {
        let env = Envelope {
            protocol_version: PROTOCOL_VERSION,
            sender: "x".repeat(MAX_TEXT + 1),
            body: GossipBody::Announce(announce()),
        };
        let signed = SignedEnvelope::new(&env, 1);
        assert!(matches!(
            SignedEnvelope::decode(&signed.encode()),
            Err(DecodeError::Invalid {
                field: "sender",
                ..
            })
        ));
        let mut signed = SignedEnvelope::new(
            &Envelope {
                sender: "x".into(),
                ..env
            },
            1,
        );
        signed.signature = vec![0; MAX_SIGNATURE + 1];
        assert!(matches!(
            SignedEnvelope::decode(&signed.encode()),
            Err(DecodeError::Invalid {
                field: "signature",
                ..
            })
        ));
        signed.signature = vec![0; 64];
        signed.body = vec![0xff, 0x00];
        let back = SignedEnvelope::decode(&signed.encode()).unwrap();
        assert!(back.open().is_err());
        let mut a = announce();
        a.capacity = u32::MAX;
        signed.body = to_cbor(&GossipBody::Announce(a));
        assert!(matches!(
            SignedEnvelope::decode(&signed.encode()).unwrap().open(),
            Err(DecodeError::Invalid {
                field: "capacity",
                ..
            })
        ));
    }

    #[test]
    fn header_of_a_future_body_is_readable() {
        #[derive(Serialize)]
        struct Future {
            protocol_version: u32,
            sender: String,
            body: BTreeMap<String, u32>,
        }
        let bytes = to_cbor(&Future {
            protocol_version: 99,
            sender: "y".into(),
            body: [("kind".to_string(), 3)].into(),
        });
        assert!(Envelope::decode(&bytes).is_err());
        assert_eq!(
            Envelope::decode_header(&bytes).unwrap().protocol_version,
            99
        );
    }

    #[test]
    fn garbage_and_oversize_are_errors() {
        assert!(matches!(
            Envelope::decode(&[0xff, 0x00, 0x13]),
            Err(DecodeError::Malformed { .. })
        ));
        let big = vec![0u8; MAX_GOSSIP_BYTES + 1];
        assert!(matches!(
            Envelope::decode(&big),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn oversized_fields_are_rejected() {
        let mut a = announce();
        a.name = "x".repeat(MAX_TEXT + 1);
        let env = Envelope {
            protocol_version: PROTOCOL_VERSION,
            sender: "x".into(),
            body: GossipBody::Announce(a),
        };
        assert!(matches!(
            Envelope::decode(&env.encode()),
            Err(DecodeError::Invalid { field: "name", .. })
        ));
    }

    #[test]
    fn a_suspicion_round_trips_and_an_oversized_subject_is_rejected() {
        let mut env = Envelope {
            protocol_version: PROTOCOL_VERSION,
            sender: "x".into(),
            body: GossipBody::Suspect(Suspicion {
                subject: "12D3KooW".into(),
                seq: 9,
            }),
        };
        assert_eq!(Envelope::decode(&env.encode()).unwrap(), env);
        env.body = GossipBody::Suspect(Suspicion {
            subject: "x".repeat(MAX_TEXT + 1),
            seq: 9,
        });
        assert!(matches!(
            Envelope::decode(&env.encode()),
            Err(DecodeError::Invalid {
                field: "subject",
                ..
            })
        ));
    }

    #[test]
    fn an_overstated_capacity_is_rejected() {
        let mut a = announce();
        a.capacity = u32::MAX;
        let env = Envelope {
            protocol_version: PROTOCOL_VERSION,
            sender: "x".into(),
            body: GossipBody::Announce(a),
        };
        assert!(matches!(
            Envelope::decode(&env.encode()),
            Err(DecodeError::Invalid {
                field: "capacity",
                ..
            })
        ));
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Envelope::decode(&bytes);
            let _ = Envelope::decode_header(&bytes);
            if let Ok(s) = SignedEnvelope::decode(&bytes) {
                let _ = s.open();
            }
            let _ = from_cbor::<MeshRequest>(&bytes, MAX_REQUEST_BYTES, "a request");
            let _ = from_cbor::<MeshResponse>(&bytes, MAX_RESPONSE_BYTES, "a response");
        }
    }
}
