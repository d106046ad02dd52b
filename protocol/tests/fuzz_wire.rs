//! Property tests (a fuzz pass on stable Rust) of every decoder of bytes from a peer:
//! gossip envelopes (announcements, run messages, snapshots), request-response requests
//! and responses, metric snapshots with their histograms, and the striping and
//! assignment inside run messages — arbitrary bytes, and valid messages mutated byte by
//! byte. The properties: nothing panics, and decoding allocates at most a small multiple
//! of the bytes received (measured by a counting allocator, per thread).
//!
//! Cases per target: `STAMPEDE_FUZZ_CASES` (default 256, the CI pass); `tools/fuzz.sh
//! DURATION` runs these targets again and again with larger counts and fresh seeds.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;
use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::Config;
use stampede_protocol::mesh::{
    from_cbor, Announce, Envelope, GossipBody, MeshRequest, MeshResponse, NodeState,
    MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, PROTOCOL_VERSION,
};
use stampede_protocol::run::{
    BarrierDetail, Bundle, Requirements, RosterEntry, RunMessage, RunRequest, RunResponse,
    SnapshotMessage,
};
use stampede_protocol::segment::{Assignment, Reassignment, Striping};
use stampede_protocol::snapshot::{
    Layout, Metrics, SeriesKey, DECODE_BASE_BUDGET, DECODE_BYTES_PER_BYTE,
};

/// Counts the bytes live on this thread and their peak, so a decode's allocation can be
/// measured while other tests run on other threads.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // `try_with`: a thread being torn down has no counters any more; nothing to note.
    let _ = LIVE.try_with(|l| {
        let now = l.get() + delta;
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        note(layout.size() as isize);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        note(-(layout.size() as isize));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        note(layout.size() as isize);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        note(new_size as isize - layout.size() as isize);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The most bytes `f` had live at once beyond what was live before it.
fn peak_of(f: impl FnOnce()) -> usize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    (PEAK.with(Cell::get) - base).max(0) as usize
}

/// What decoding `len` bytes may allocate: serde preallocates at most 1 MiB per
/// sequence a message claims (and a message nests a few), plus a multiple of the input.
fn bound(len: usize) -> usize {
    8 * 1024 * 1024 + 64 * len
}

fn cases() -> u32 {
    std::env::var("STAMPEDE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> Config {
    Config {
        cases: cases(),
        max_shrink_iters: 2048,
        ..Config::default()
    }
}

/// Every decoder a peer's bytes reach, each checked for its allocation.
fn decode_everything(bytes: &[u8]) {
    let wire = peak_of(|| {
        let _ = Envelope::decode(bytes);
        let _ = Envelope::decode_header(bytes);
        let _ = from_cbor::<MeshRequest>(bytes, MAX_REQUEST_BYTES, "a request");
        let _ = from_cbor::<MeshResponse>(bytes, MAX_RESPONSE_BYTES, "a response");
        let _ = from_cbor::<RunMessage>(bytes, MAX_REQUEST_BYTES, "a run message");
        let _ = from_cbor::<Assignment>(bytes, MAX_REQUEST_BYTES, "an assignment");
        let _ = from_cbor::<Striping>(bytes, MAX_REQUEST_BYTES, "a striping");
    });
    assert!(
        wire <= bound(bytes.len()),
        "decoding {} bytes allocated {wire} bytes at once",
        bytes.len()
    );
    let metrics = peak_of(|| {
        let _ = Metrics::decode(bytes);
    });
    let metrics_bound =
        bound(bytes.len()) + DECODE_BASE_BUDGET + DECODE_BYTES_PER_BYTE * bytes.len();
    assert!(
        metrics <= metrics_bound,
        "decoding {} bytes of metrics allocated {metrics} bytes at once",
        bytes.len()
    );
}

fn layout() -> Layout {
    Layout {
        scenarios: vec!["s".into()],
        flows: vec!["f".into()],
        flow_slots: vec![(0, 0)],
        series: (0..3)
            .map(|step| SeriesKey {
                scenario: 0,
                flow: 0,
                step,
                step_name: format!("step{step}"),
            })
            .collect(),
    }
}

fn metrics() -> Metrics {
    let mut m = Metrics::new(&layout());
    for (i, s) in m.series.iter_mut().enumerate() {
        for v in 0..200u64 {
            s.latency.record(v * 37 + i as u64);
            s.service.record(v * 11 + 1);
        }
        s.requests = 200;
        s.errors[4] = 3;
    }
    m.scenarios[0].iterations = 600;
    m.scenarios[0].schedule_lag.record(1500);
    m.flow_iterations[0] = 600;
    m
}

fn envelope(body: GossipBody) -> Vec<u8> {
    Envelope {
        protocol_version: PROTOCOL_VERSION,
        sender: "12D3KooWsender".into(),
        body,
    }
    .encode()
}

/// One valid encoding of every kind of message a peer sends.
fn valid_messages() -> Vec<Vec<u8>> {
    let run = |m: RunMessage| envelope(GossipBody::Run(Box::new(m)));
    let mut assignment = Assignment::new(Striping::from_weights(&[3, 1, 2, 5]).unwrap());
    assignment
        .reassign(Reassignment::new(1, 40, &[(0, 3), (2, 2), (3, 5)]).unwrap())
        .unwrap();
    let bundle = Bundle {
        plan_name: "p.toml".into(),
        plan: "name = \"x\"\n".into(),
        files: [("d.csv".to_string(), b"user,pass\na,b\n".to_vec())].into(),
    };
    vec![
        envelope(GossipBody::Announce(Announce {
            id: "12D3KooWa".into(),
            name: "n1".into(),
            version: "0.1.0".into(),
            protocol_version: PROTOCOL_VERSION,
            labels: [("region".to_string(), "eu".to_string())].into(),
            capacity: 4,
            state: NodeState::Idle,
            allow_targets: vec!["127.0.0.1".into()],
            addrs: vec!["/ip4/127.0.0.1/tcp/7400".into()],
            seq: 99,
            signature: vec![7; 64],
        })),
        run(RunMessage::Propose {
            run_id: "6932a8b2-0f3c".into(),
            origin: "o".into(),
            bundle_hash: bundle.hash(),
            plan: "p".into(),
            requirements: Requirements {
                min_nodes: 2,
                require_all: true,
                labels: BTreeMap::new(),
            },
        }),
        run(RunMessage::Roster {
            run_id: "6932a8b2-0f3c".into(),
            members: vec![RosterEntry {
                id: "a".into(),
                name: "a".into(),
                labels: BTreeMap::new(),
                weight: 2,
            }],
            refused: vec![("b".into(), "no".into())],
            fan_in: 32,
        }),
        run(RunMessage::Arrive {
            run_id: "6932a8b2-0f3c".into(),
            barrier: stampede_protocol::machine::events::Barrier::Finished,
            detail: BarrierDetail {
                snapshots: Some(30),
                ..Default::default()
            },
        }),
        run(RunMessage::Assign {
            run_id: "6932a8b2-0f3c".into(),
            term: 1,
            version: stampede_protocol::machine::version::Version {
                id: stampede_protocol::machine::version::VersionId { term: 1, seq: 2 },
                start_unix_us: 1_700_000_000_000_000,
                moves: vec![stampede_protocol::machine::version::Move {
                    lost: 1,
                    from_event: 300,
                    at_us: 5_000_000,
                    claims: vec![40, 7],
                    takers: vec![0b101],
                }],
            },
        }),
        run(RunMessage::Beat {
            run_id: "6932a8b2-0f3c".into(),
            term: 2,
            sent_us: 123_456,
            version: None,
            echoes: vec![(0, 99), (2, 101)],
            fenced: vec![1],
            claims: vec![12, 3],
            fenced_claims: vec![vec![9, 2]],
            arrived: vec![(
                stampede_protocol::machine::events::Barrier::Ready,
                BarrierDetail {
                    clock_offset_us: Some(-40),
                    ..Default::default()
                },
            )],
            wants_echo: true,
            digest: 0x1234_5678,
            complete: vec![stampede_protocol::machine::events::Barrier::Ready],
            received: vec![stampede_protocol::machine::events::Barrier::Started],
        }),
        envelope(GossipBody::Snapshot(Box::new(SnapshotMessage {
            run_id: "6932a8b2-0f3c".into(),
            node: "a".into(),
            seq: 3,
            vus: 10,
            cpu: 0.5,
            metrics: metrics().encode(),
        }))),
        envelope(GossipBody::Batch(Box::new(
            stampede_protocol::run::BatchMessage {
                run_id: "6932a8b2-0f3c".into(),
                seq: 3,
                covers: stampede_protocol::run::covers_bitmap(&[0, 5, 9]),
                vus: 10,
                cpu: 0.5,
                metrics: metrics().encode(),
            },
        ))),
        stampede_protocol::mesh::to_cbor(&MeshRequest::Run(RunRequest::Batch(Box::new(
            stampede_protocol::run::BatchMessage {
                run_id: "6932a8b2-0f3c".into(),
                seq: 4,
                covers: stampede_protocol::run::covers_bitmap(&[1]),
                vus: 1,
                cpu: 0.1,
                metrics: metrics().encode(),
            },
        )))),
        stampede_protocol::mesh::to_cbor(&MeshRequest::Run(RunRequest::Snapshots {
            run_id: "6932a8b2-0f3c".into(),
            node: "a".into(),
            seqs: vec![1, 2, 3],
        })),
        stampede_protocol::mesh::to_cbor(&MeshResponse::Run(RunResponse::Bundle { bundle })),
        metrics().encode(),
        // A reporter's ask for a member's own totals, and the member's answer.
        stampede_protocol::mesh::to_cbor(&MeshRequest::Run(RunRequest::Own {
            run_id: "6932a8b2-0f3c".into(),
            end: 700,
        })),
        stampede_protocol::mesh::to_cbor(&MeshResponse::Run(RunResponse::Own(Box::new(
            stampede_protocol::run::OwnTotals {
                run_id: "6932a8b2-0f3c".into(),
                node: "a".into(),
                seconds: 700,
                vus: 3,
                cpu: 0.25,
                metrics: metrics().encode(),
                timeline: vec![
                    stampede_protocol::run::TimelinePoint {
                        t: 90,
                        width_s: 10,
                        requests: 40,
                        errors_by_class: [("timeout".to_string(), 2)].into(),
                        named: [("ws_msgs_sent".to_string(), 5)].into(),
                        ..Default::default()
                    },
                    stampede_protocol::run::TimelinePoint {
                        t: 100,
                        width_s: 1,
                        requests: 4,
                        ..Default::default()
                    },
                ],
            },
        )))),
    ]
}

/// Byte edits: (kind, position, value); applied modulo the message's length.
fn mutate(mut bytes: Vec<u8>, edits: &[(u8, usize, u8)]) -> Vec<u8> {
    for &(kind, pos, value) in edits {
        if bytes.is_empty() {
            bytes.push(value);
            continue;
        }
        let at = pos % bytes.len();
        match kind % 5 {
            0 => bytes[at] = value,
            1 => bytes[at] ^= 1 << (value % 8),
            2 => bytes.insert(at, value),
            3 => {
                bytes.remove(at);
            }
            // A length or count field made huge: the classic way to ask for memory.
            _ => bytes
                .splice(at..at, [0x1b, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, value])
                .for_each(drop),
        }
    }
    bytes
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_wire_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_everything(&bytes);
    }

    #[test]
    fn fuzz_wire_mutations(
        pick in 0usize..14,
        edits in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<usize>()),
    ) {
        let messages = valid_messages();
        let mut bytes = mutate(messages[pick % messages.len()].clone(), &edits);
        if let Some(cut) = cut {
            bytes.truncate(cut % (bytes.len() + 1));
        }
        decode_everything(&bytes);
    }

    #[test]
    fn fuzz_striping_sequences(
        cuts in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..64),
        weights in proptest::collection::vec(1u64..1_000_000, 1..40),
    ) {
        // Arbitrary boundaries: refused or a striping whose owners cover the period.
        let mut cbor = Vec::new();
        ciborium::into_writer(&cuts, &mut cbor).unwrap();
        if let Ok(s) = ciborium::from_reader::<Striping, _>(&cbor[..]) {
            let total: u64 = (0..s.segments()).map(|i| s.share(i)).sum();
            prop_assert_eq!(total, s.period());
        }
        // Capacity weights always stripe, and decode back to the same striping.
        let s = Striping::from_weights(&weights).unwrap();
        let mut cbor = Vec::new();
        ciborium::into_writer(&s, &mut cbor).unwrap();
        prop_assert_eq!(ciborium::from_reader::<Striping, _>(&cbor[..]).unwrap(), s);
    }
}

#[test]
fn the_counting_allocator_sees_a_large_allocation() {
    let peak = peak_of(|| drop(std::hint::black_box(vec![1u8; 10 << 20])));
    assert!(peak >= 10 << 20, "{peak}");
}

#[test]
fn valid_messages_decode() {
    // The mutation corpus starts from messages that are accepted as they are.
    let messages = valid_messages();
    for m in &messages[..8] {
        Envelope::decode(m).unwrap();
    }
    for m in &messages[8..10] {
        let r = from_cbor::<MeshRequest>(m, MAX_REQUEST_BYTES, "a request").unwrap();
        if let MeshRequest::Run(r) = r {
            r.validate().unwrap();
        }
    }
    from_cbor::<MeshResponse>(&messages[10], MAX_RESPONSE_BYTES, "a response").unwrap();
    assert_eq!(Metrics::decode(&messages[11]).unwrap(), metrics());
    match from_cbor::<MeshRequest>(&messages[12], MAX_REQUEST_BYTES, "a request").unwrap() {
        MeshRequest::Run(r) => r.validate().unwrap(),
        other => panic!("not a run request: {other:?}"),
    }
    match from_cbor::<MeshResponse>(&messages[13], MAX_RESPONSE_BYTES, "a response").unwrap() {
        MeshResponse::Run(RunResponse::Own(o)) => {
            o.validate().unwrap();
            assert_eq!(Metrics::decode(&o.metrics).unwrap(), metrics());
        }
        other => panic!("not an own answer: {other:?}"),
    }
}
