//! Hostile input does not crash a node: garbage bytes on its mesh, control and HTTP
//! ports, and garbage or oversized gossip and requests from a peer that holds the key.

mod mesh_support;

use std::future::Future;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identity, request_response, Multiaddr, StreamProtocol};
use mesh_support::{all_see, wait_until, Mesh};
use stampede::mesh::behaviour;
use stampede_protocol::mesh::{
    to_cbor, Announce, Envelope, GossipBody, NodeState, SignedEnvelope, PROTOCOL_VERSION,
};

#[test]
fn garbage_on_every_port_does_not_crash_a_node() {
    let mesh = Mesh::new();
    let mut n1 = mesh.node("n1", &[], &[]);
    let n2 = mesh.node("n2", &["--bootstrap", &n1.addr()], &[]);
    let ids = vec![n1.peer_id(), n2.peer_id()];
    assert!(wait_until(Duration::from_secs(30), || all_see(
        &[&n1, &n2],
        &ids
    )));

    let ctl = n1.control().unwrap();
    let mesh_port = n1.addr().split('/').nth(4).unwrap().to_string();
    let targets = [
        format!("127.0.0.1:{mesh_port}"),
        ctl["addr"].as_str().unwrap().to_string(),
        ctl["http"].as_str().unwrap().to_string(),
    ];
    let mut rng_state = 0x2545_f491_4f6c_dd1du64;
    for t in &targets {
        for size in [1usize, 24, 4096, 3 * 1024 * 1024] {
            let mut garbage = vec![0u8; size];
            for b in garbage.iter_mut() {
                rng_state ^= rng_state << 13;
                rng_state ^= rng_state >> 7;
                rng_state ^= rng_state << 17;
                *b = rng_state as u8;
            }
            if let Ok(mut s) = std::net::TcpStream::connect(t) {
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = s.write_all(&garbage);
                let mut sink = [0u8; 256];
                let _ = s.read(&mut sink);
            }
        }
    }
    // An unterminated 2 MiB control request line.
    if let Ok(mut s) = std::net::TcpStream::connect(ctl["addr"].as_str().unwrap()) {
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(&vec![b'{'; 2 * 1024 * 1024]);
    }
    assert!(n1.running(), "node died; log:\n{}", n1.log_text());
    assert!(
        wait_until(Duration::from_secs(10), || all_see(&[&n1, &n2], &ids)),
        "mesh broke after garbage"
    );
}

/// A request-response codec that writes whatever bytes it is given, unframed.
#[derive(Clone, Default)]
struct RawCodec;

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    fn read_request<'a, 'b, 'c, 'f, T>(
        &'a mut self,
        _: &'b StreamProtocol,
        io: &'c mut T,
    ) -> BoxFut<'f, Vec<u8>>
    where
        T: AsyncRead + Unpin + Send + 'f,
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let mut v = Vec::new();
            io.take(1 << 20).read_to_end(&mut v).await?;
            Ok(v)
        })
    }

    fn read_response<'a, 'b, 'c, 'f, T>(
        &'a mut self,
        _: &'b StreamProtocol,
        io: &'c mut T,
    ) -> BoxFut<'f, Vec<u8>>
    where
        T: AsyncRead + Unpin + Send + 'f,
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let mut v = Vec::new();
            io.take(1 << 20).read_to_end(&mut v).await?;
            Ok(v)
        })
    }

    fn write_request<'a, 'b, 'c, 'f, T>(
        &'a mut self,
        _: &'b StreamProtocol,
        io: &'c mut T,
        req: Vec<u8>,
    ) -> BoxFut<'f, ()>
    where
        T: AsyncWrite + Unpin + Send + 'f,
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            io.write_all(&req).await?;
            io.close().await
        })
    }

    fn write_response<'a, 'b, 'c, 'f, T>(
        &'a mut self,
        _: &'b StreamProtocol,
        io: &'c mut T,
        res: Vec<u8>,
    ) -> BoxFut<'f, ()>
    where
        T: AsyncWrite + Unpin + Send + 'f,
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            io.write_all(&res).await?;
            io.close().await
        })
    }
}

#[derive(NetworkBehaviour)]
struct Hostile {
    gossipsub: gossipsub::Behaviour,
    raw: request_response::Behaviour<RawCodec>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_a_keyed_peer_does_not_crash_a_node() {
    let mesh = Mesh::new();
    let mut n1 = mesh.node("n1", &[], &[]);
    let n1_id: libp2p::PeerId = n1.peer_id().parse().unwrap();
    let n1_addr: Multiaddr = n1.addr().parse().unwrap();

    // A peer holding the mesh key, whose gossip allows 4 MiB (the mesh allows 1 MiB).
    let kp = identity::Keypair::generate_ed25519();
    let gs_cfg = behaviour::gossipsub_config(Duration::from_millis(200), 4 * 1024 * 1024).unwrap();
    // (The mesh's gossipsub carries no gossipsub signatures: messages are signed inside.)
    let gossipsub = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, gs_cfg).unwrap();
    let raw = request_response::Behaviour::with_codec(
        RawCodec,
        [(
            StreamProtocol::new("/stampede/bulk/1"),
            request_response::ProtocolSupport::Outbound,
        )],
        request_response::Config::default().with_request_timeout(Duration::from_secs(5)),
    );
    let mut swarm = mesh_support::keyed_swarm(&mesh, &kp, Hostile { gossipsub, raw });
    let topic = IdentTopic::new(behaviour::ANNOUNCE_TOPIC);
    swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
    swarm.dial(n1_addr).unwrap();

    // Wait until n1's subscription has arrived (publishing before fails).
    let subscribed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(HostileEvent::Gossipsub(gossipsub::Event::Subscribed {
                    peer_id,
                    topic: t,
                })) if peer_id == n1_id && t == topic.hash() => break,
                _ => {}
            }
        }
    })
    .await;
    assert!(
        subscribed.is_ok(),
        "n1 never subscribed; log:\n{}",
        n1.log_text()
    );

    // Garbage, a spoofed announcement (claims to be n1), and an oversized message.
    let mut published = 0;
    let mut errors = Vec::new();
    let spoof = Envelope {
        protocol_version: PROTOCOL_VERSION,
        sender: n1.peer_id(),
        body: GossipBody::Announce(Announce {
            id: n1.peer_id(),
            name: "spoofed".into(),
            version: "0".into(),
            protocol_version: PROTOCOL_VERSION,
            labels: Default::default(),
            capacity: 1,
            state: NodeState::Idle,
            allow_targets: vec![],
            addrs: vec![],
            seq: u64::MAX,
            signature: vec![],
        }),
    };
    let payloads: Vec<Vec<u8>> = vec![
        vec![0xff; 100],
        (0..=255u8).cycle().take(70_000).collect(),
        spoof.encode(),
        to_cbor(&"just a string"),
        vec![7u8; 1536 * 1024],
    ];
    for p in payloads {
        match swarm.behaviour_mut().gossipsub.publish(topic.clone(), p) {
            Ok(_) => published += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(
        published >= 4,
        "could not publish the hostile messages: {errors:?}"
    );
    // Garbage requests: a frame claiming 4 GiB, and a short frame of junk.
    let r1 = swarm
        .behaviour_mut()
        .raw
        .send_request(&n1_id, vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    let r2 = swarm
        .behaviour_mut()
        .raw
        .send_request(&n1_id, vec![0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef]);
    let mut done = std::collections::HashSet::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while done.len() < 2 {
            match swarm.select_next_some().await {
                SwarmEvent::Behaviour(HostileEvent::Raw(
                    request_response::Event::OutboundFailure {
                        request_id, error, ..
                    },
                )) => {
                    eprintln!("hostile request {request_id}: {error}");
                    done.insert(request_id);
                }
                SwarmEvent::Behaviour(HostileEvent::Raw(request_response::Event::Message {
                    message:
                        request_response::Message::Response {
                            request_id,
                            response,
                        },
                    ..
                })) => {
                    assert!(
                        response.is_empty(),
                        "the node answered garbage with {response:?}"
                    );
                    done.insert(request_id);
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(
        done.contains(&r1) && done.contains(&r2),
        "the garbage requests never completed"
    );
    drop(swarm);

    // The node saw and dropped the gossip (debug log), rather than never receiving it.
    // (The garbage requests got a closed stream: no response bytes.)
    let dropped = wait_until(Duration::from_secs(10), || {
        n1.log_text().contains("dropped a gossip message")
    });
    assert!(
        dropped,
        "no trace of the hostile input in the log:\n{}",
        n1.log_text()
    );

    assert!(n1.running(), "node died; log:\n{}", n1.log_text());
    // The node still works, and the spoof changed nothing: it does not list itself twice.
    let rows = n1.peers().expect("peers still answers");
    assert!(rows.iter().all(|r| r["name"] != "spoofed"), "{rows:?}");
    assert_eq!(rows.iter().filter(|r| r["id"] == n1.peer_id()).count(), 1);
    // A fresh keyed node still joins.
    let n2 = mesh.node("n2", &["--bootstrap", &n1.addr()], &[]);
    let ids = vec![n1.peer_id(), n2.peer_id()];
    assert!(wait_until(Duration::from_secs(30), || all_see(
        &[&n1, &n2],
        &ids
    )));
}

/// A record `name` of `id`, as an announcement would carry it (unsigned: on gossip the
/// envelope's signature is what vouches for it).
fn record(id: &str, name: &str, seq: u64) -> Envelope {
    Envelope {
        protocol_version: PROTOCOL_VERSION,
        sender: id.to_string(),
        body: GossipBody::Announce(Announce {
            id: id.to_string(),
            name: name.into(),
            version: "0".into(),
            protocol_version: PROTOCOL_VERSION,
            labels: Default::default(),
            capacity: 1,
            state: NodeState::Idle,
            allow_targets: vec![],
            addrs: vec![],
            seq,
            signature: vec![],
        }),
    }
}

/// Gossipsub no longer signs (the sender signs inside the message, and the receiver
/// checks it once): a peer that holds the mesh key must still not be able to speak as
/// another member. It publishes n2's record under n2's name, signed with its own key,
/// then its own record; n1 takes its own record (so it read both, in order) and never
/// the forged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_peer_cannot_speak_as_another_member() {
    let mesh = Mesh::new();
    let n1 = mesh.node("n1", &[], &[]);
    let n2 = mesh.node("n2", &["--bootstrap", &n1.addr()], &[]);
    let ids = vec![n1.peer_id(), n2.peer_id()];
    assert!(wait_until(Duration::from_secs(30), || all_see(
        &[&n1, &n2],
        &ids
    )));
    let n1_id: libp2p::PeerId = n1.peer_id().parse().unwrap();

    let kp = identity::Keypair::generate_ed25519();
    let me = kp.public().to_peer_id().to_string();
    let gs_cfg = behaviour::gossipsub_config(Duration::from_millis(200), 1024 * 1024).unwrap();
    let gossipsub = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, gs_cfg).unwrap();
    let raw = request_response::Behaviour::with_codec(
        RawCodec,
        [(
            StreamProtocol::new("/stampede/bulk/1"),
            request_response::ProtocolSupport::Outbound,
        )],
        request_response::Config::default(),
    );
    let mut swarm = mesh_support::keyed_swarm(&mesh, &kp, Hostile { gossipsub, raw });
    let topic = IdentTopic::new(behaviour::ANNOUNCE_TOPIC);
    swarm.behaviour_mut().gossipsub.subscribe(&topic).unwrap();
    swarm.dial(n1.addr().parse::<Multiaddr>().unwrap()).unwrap();
    let subscribed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let SwarmEvent::Behaviour(HostileEvent::Gossipsub(gossipsub::Event::Subscribed {
                peer_id,
                topic: t,
            })) = swarm.select_next_some().await
            {
                if peer_id == n1_id && t == topic.hash() {
                    break;
                }
            }
        }
    })
    .await;
    assert!(subscribed.is_ok(), "n1 never subscribed");

    let now_us = stampede_protocol::run::unix_us();
    let seal = |env: &Envelope, nonce: u64| {
        let mut s = SignedEnvelope::new(env, nonce);
        s.signature = kp.sign(&s.signed_bytes()).unwrap();
        s.encode()
    };
    // Newer than n2's own record, so that it would win if taken.
    let forged = seal(&record(&n2.peer_id(), "spoofed", now_us + 600_000_000), 1);
    let own = seal(&record(&me, "hostile", now_us), 2);
    for m in [forged, own] {
        swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic.clone(), m)
            .expect("published");
    }
    let driver = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let heard_own = wait_until(Duration::from_secs(20), || {
        n1.peers()
            .unwrap_or_default()
            .iter()
            .any(|r| r["name"] == "hostile")
    });
    driver.abort();
    assert!(
        heard_own,
        "n1 never took the peer's own record; log:\n{}",
        n1.log_text()
    );
    let rows = n1.peers().expect("peers answers");
    assert!(rows.iter().all(|r| r["name"] != "spoofed"), "{rows:?}");
    let n2_row = rows
        .iter()
        .find(|r| r["id"] == n2.peer_id())
        .expect("n2 listed");
    assert_eq!(n2_row["name"], "n2", "{rows:?}");
}
