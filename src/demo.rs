//! `webhookd demo`: the daemon on its embedded broker, plus a receiver that
//! verifies signatures and a producer of sample events, all on loopback, so a
//! newcomer sees deliveries, a retry, dead letters and metrics move.
//!
//! The receiver answers by path: `/crm` fails the first attempt of every
//! seventh event with 503 (a retry follows), `/billing` rejects every tenth
//! event with 422 (a dead letter). Every twenty-fifth message the producer
//! sends is not JSON (an invalid-event dead letter).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::deliver::sign::{Secrets, signature_header};

const CATALOGUE: &[&str] = &[
    "ContactCreate",
    "ContactUpdate",
    "ContactDelete",
    "ContactTagUpdate",
    "ContactDndUpdate",
    "AppointmentCreate",
    "AppointmentUpdate",
    "AppointmentDelete",
    "OpportunityCreate",
    "OpportunityUpdate",
    "OpportunityStageUpdate",
    "InvoiceCreate",
    "InvoicePaid",
    "InboundMessage",
    "OutboundMessage",
    "NoteCreate",
    "TaskCreate",
    "FormSubmitted",
];

#[derive(Default)]
struct Receiver {
    secrets: HashMap<String, Secrets>,
    seen: Mutex<HashMap<String, u32>>,
}

pub async fn run(config: Config, events: u32, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = receiver_addr(&config)?;
    let receiver = Arc::new(Receiver {
        secrets: config.endpoints.iter().map(|e| (e.url.path().to_owned(), e.secrets.clone())).collect(),
        ..Receiver::default()
    });
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("demo receiver on {addr}"))?;
    tokio::spawn(serve(listener, receiver, shutdown.clone()));
    let topic = config.source.topics[0].clone();
    let started = crate::app::start(config, shutdown.clone()).await?;
    println!(
        "\n  webhookd demo: broker {}  metrics http://{}/metrics  receiver http://{addr}\n",
        started.bootstrap, started.admin_addr
    );
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &started.bootstrap).create()?;
    let run_id = crate::store::now_ms();
    for i in 0..events {
        if shutdown.is_cancelled() {
            break;
        }
        let ty = CATALOGUE[i as usize % CATALOGUE.len()];
        let body = if i % 25 == 24 {
            "{ this is not JSON".to_owned()
        } else {
            serde_json::json!({
                "id": format!("evt_{run_id}_{i}"), "type": ty, "locationId": format!("loc_{}", i % 3),
                "data": { "id": format!("obj_{i}"), "email": format!("user{i}@example.com") }
            })
            .to_string()
        };
        if let Err((e, _)) =
            producer.send(FutureRecord::<(), _>::to(&topic).payload(&body), Duration::from_secs(5)).await
        {
            eprintln!("demo producer: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(150)) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    drop(producer);
    println!(
        "\n  demo producer done ({events} events). Counters: curl -s http://{}/metrics | grep ^webhookd_ ; Ctrl-C to stop.\n",
        started.admin_addr
    );
    started.wait().await?;
    Ok(())
}

fn receiver_addr(config: &Config) -> anyhow::Result<SocketAddr> {
    let url = &config.endpoints.first().context("the demo config needs endpoints")?.url;
    let host = url.host_str().context("endpoint URL has no host")?;
    let port = url.port_or_known_default().context("endpoint URL has no port")?;
    format!("{host}:{port}").parse().context("the demo receiver needs an IP address in the endpoint URL")
}

async fn serve(listener: tokio::net::TcpListener, receiver: Arc<Receiver>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            s = listener.accept() => match s { Ok((s, _)) => s, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let receiver = receiver.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(receiver.clone(), req));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn handle(r: Arc<Receiver>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_owned();
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (id, ts, sig) = (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
    let body = req.into_body().collect().await?.to_bytes();
    let verified = match (r.secrets.get(&path), ts.parse::<i64>()) {
        (Some(secrets), Ok(ts)) => {
            let expected = signature_header(secrets.active(ts), &id, ts, &body);
            expected.split(' ').any(|s| sig.split(' ').any(|g| g == s))
        }
        _ => false,
    };
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let n: u32 = event["id"].as_str().and_then(|s| s.rsplit('_').next()?.parse().ok()).unwrap_or(0);
    let attempt = {
        let mut seen = r.seen.lock().unwrap_or_else(|p| p.into_inner());
        let a = seen.entry(id.clone()).or_default();
        *a += 1;
        *a
    };
    let status = match path.as_str() {
        _ if !verified => StatusCode::UNAUTHORIZED,
        "/crm" if n % 7 == 3 && attempt == 1 => StatusCode::SERVICE_UNAVAILABLE,
        "/billing" if n % 10 == 9 => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::OK,
    };
    println!(
        "  receiver {path:<9} ← {:<22} {:<24} attempt {attempt}  signature {}  → {}",
        event["type"].as_str().unwrap_or("?"),
        event["id"].as_str().unwrap_or("?"),
        if verified { "ok" } else { "BAD" },
        status.as_u16()
    );
    Ok(Response::builder().status(status).body(Full::new(Bytes::new())).expect("static response"))
}
