//! A keyed peer misusing the direct streams (`/stampede/direct/1`, node/src/mesh/direct.rs)
//! neither crashes a node nor holds more of it than its share: a frame claiming 4 GiB,
//! junk, a request that does not belong on the stream, more streams than a peer may
//! hold, and a flood of run messages for no run. Afterwards the node still answers and
//! a fresh node still joins it.

mod mesh_support;

use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identity, Multiaddr, PeerId, Stream, StreamProtocol};
use mesh_support::{all_see, wait_until, Mesh};
use stampede_protocol::mesh::{to_cbor, MeshRequest, PROTOCOL_VERSION};
use stampede_protocol::run::{RunMessage, RunRequest};

const DIRECT: StreamProtocol = StreamProtocol::new("/stampede/direct/1");

#[derive(NetworkBehaviour)]
struct Hostile {
    stream: libp2p_stream::Behaviour,
}

/// Whether the node closed `s` within `limit`: a read ends (EOF or an error) rather
/// than waiting for bytes the node would never send on a healthy stream. The one byte
/// a node sends as it takes a stream up (its acknowledgement) is read past.
async fn closed_within(s: &mut Stream, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 16];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut f = (bytes.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(bytes);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_misusing_direct_streams_gets_them_closed_and_the_node_goes_on() {
    let mesh = Mesh::new();
    let mut n1 = mesh.node("n1", &[], &[]);
    let n1_id: PeerId = n1.peer_id().parse().unwrap();
    let n1_addr: Multiaddr = n1.addr().parse().unwrap();

    let kp = identity::Keypair::generate_ed25519();
    let mut swarm = mesh_support::keyed_swarm(
        &mesh,
        &kp,
        Hostile {
            stream: libp2p_stream::Behaviour::new(),
        },
    );
    let control = swarm.behaviour().stream.new_control();
    swarm.dial(n1_addr).unwrap();
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let open = || {
        let mut c = control.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(15), c.open_stream(n1_id, DIRECT))
                .await
                .expect("a direct stream within 15 s")
                .expect("the node takes direct streams")
        }
    };

    // Each rule broken on a stream of its own; the node closes each.
    let members = to_cbor(&MeshRequest::Members);
    let rules: [(&str, Vec<u8>); 3] = [
        (
            "a frame claiming 4 GiB",
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
        ),
        ("junk in a frame", frame(&[0xde, 0xad, 0xbe, 0xef])),
        ("a members request", frame(&members)),
    ];
    for (what, bytes) in rules {
        let mut s = open().await;
        s.write_all(&bytes).await.unwrap();
        s.flush().await.unwrap();
        assert!(
            closed_within(&mut s, Duration::from_secs(15)).await,
            "{what}: the stream stayed open"
        );
    }

    // More streams than a peer may hold: the node keeps 4 and closes the rest at once.
    let mut streams = Vec::new();
    let mut refused_at_once = 0;
    for _ in 0..10 {
        let mut s = open().await;
        // A first valid frame, so that each stream reaches the node's accept loop.
        let stop = to_cbor(&MeshRequest::Run(RunRequest::Message {
            protocol_version: PROTOCOL_VERSION,
            msg: Box::new(RunMessage::Stop {
                run_id: "5f0a1b2c-0001".into(),
                reason: "no such run".into(),
            }),
        }));
        let sent = async {
            s.write_all(&frame(&stop)).await?;
            s.flush().await
        };
        // A refused stream may already be reset by the time the frame goes out.
        if sent.await.is_err() {
            refused_at_once += 1;
        } else {
            streams.push(s);
        }
    }
    // Read the others at once: a closed one ends at once, a kept one waits out the limit.
    let verdicts = futures::future::join_all(
        streams
            .iter_mut()
            .map(|s| closed_within(s, Duration::from_secs(15))),
    )
    .await;
    let closed = refused_at_once + verdicts.iter().filter(|c| **c).count();
    assert_eq!(closed, 6, "10 streams from one peer: 4 kept, 6 closed");

    // A flood of well-formed run messages for no run, on a kept stream: dropped by the
    // run driver, the stream stays usable, the node stays up.
    let flood = frame(&to_cbor(&MeshRequest::Run(RunRequest::Message {
        protocol_version: PROTOCOL_VERSION,
        msg: Box::new(RunMessage::Stop {
            run_id: "5f0a1b2c-0002".into(),
            reason: "flood".into(),
        }),
    })));
    let kept = streams
        .iter_mut()
        .zip(&verdicts)
        .find(|(_, closed)| !**closed)
        .map(|(s, _)| s)
        .expect("a kept stream");
    let burst: Vec<u8> = flood
        .iter()
        .copied()
        .cycle()
        .take(flood.len() * 5_000)
        .collect();
    tokio::time::timeout(Duration::from_secs(30), kept.write_all(&burst))
        .await
        .expect("the node reads a flood within 30 s")
        .expect("the kept stream takes the flood");
    drop(streams);
    driver.abort();

    assert!(n1.running(), "node died; log:\n{}", n1.log_text());
    assert!(
        n1.log_text()
            .contains("direct stream closed: a bad message"),
        "no trace of the refused messages in the log:\n{}",
        n1.log_text()
    );
    let rows = n1.peers().expect("peers still answers");
    assert_eq!(rows.iter().filter(|r| r["id"] == n1.peer_id()).count(), 1);
    let n2 = mesh.node("n2", &["--bootstrap", &n1.addr()], &[]);
    let ids = vec![n1.peer_id(), n2.peer_id()];
    assert!(wait_until(Duration::from_secs(30), || all_see(
        &[&n1, &n2],
        &ids
    )));
}
