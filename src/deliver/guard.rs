//! The SSRF guard: which addresses a delivery may connect to.
//!
//! Endpoint URLs are written by people who may be careless or hostile, so
//! webhookd must never become a way into the network it runs in. The check
//! sits inside the pooled client's connector, which gives three properties:
//!
//! - **Every address is checked.** A name is resolved once, every address it
//!   resolves to is checked, and one disallowed address refuses the whole name
//!   (otherwise a hostile DNS server could list a public address first and
//!   `10.0.0.1` second, and wait for the first to fail).
//! - **The connection is pinned to what was checked.** hyper's connector
//!   connects to exactly the addresses [`GuardedResolver`] returned and never
//!   looks the name up again, so DNS rebinding between check and connect has
//!   nothing to slip through.
//! - **IP literals are checked too.** hyper's connector does not resolve a host
//!   that parses as an IP address; [`GuardedConnector`] checks those before
//!   handing the request on. Other spellings of an address (`2130706433`,
//!   `0x7f.1`, `0177.0.0.1`) are normalised by the URL parser, and anything the
//!   connector would treat as a name goes through the resolver.
//!
//! Pooling is untouched: a pooled connection was checked when it was opened.
//!
//! Refused by default: loopback, RFC 1918, carrier-grade NAT, link-local (and so
//! the cloud metadata address 169.254.169.254), multicast, broadcast,
//! unspecified and the other IANA special-purpose IPv4 ranges; for IPv6,
//! everything outside global unicast `2000::/3` (loopback, unique-local
//! `fc00::/7` with AWS's `fd00:ec2::254`, link-local, multicast, IPv4-mapped and
//! IPv4-compatible forms) plus Teredo, 6to4, documentation and benchmarking
//! ranges; NAT64 addresses (`64:ff9b::/96`) are judged, and matched against the
//! lists, by the IPv4 address they carry. A site-specific NAT64 prefix cannot
//! be recognised: deny it with `delivery.deny_networks`.
//! `delivery.allow_networks` lets chosen ranges through; `delivery.deny_networks`
//! refuses more, and wins over the allow-list.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::client::legacy::connect::dns::Name;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// IANA special-purpose IPv4 ranges, most specific first.
static SPECIAL_V4: LazyLock<Vec<(Ipv4Net, &'static str)>> = LazyLock::new(|| {
    [
        ("255.255.255.255/32", "the broadcast address"),
        ("169.254.169.254/32", "the cloud metadata address"),
        ("0.0.0.0/8", "an unspecified (\"this network\") address"),
        ("10.0.0.0/8", "a private address (RFC 1918)"),
        ("100.64.0.0/10", "a carrier-grade NAT address (RFC 6598)"),
        ("127.0.0.0/8", "a loopback address"),
        ("169.254.0.0/16", "a link-local address"),
        ("172.16.0.0/12", "a private address (RFC 1918)"),
        ("192.0.0.0/24", "an IETF protocol assignment"),
        ("192.0.2.0/24", "a documentation address"),
        ("192.88.99.0/24", "a 6to4 relay anycast address"),
        ("192.168.0.0/16", "a private address (RFC 1918)"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),
    ]
    .into_iter()
    .map(|(net, why)| (net.parse().expect("static CIDR parses"), why))
    .collect()
});

/// IPv6 ranges refused even though some lie inside global unicast; checked
/// before the "outside 2000::/3" rule, most specific first.
static SPECIAL_V6: LazyLock<Vec<(Ipv6Net, &'static str)>> = LazyLock::new(|| {
    [
        ("::/128", "the unspecified address"),
        ("::1/128", "the loopback address"),
        ("::ffff:0:0/96", "an IPv4-mapped IPv6 address"),
        ("::ffff:0:0:0/96", "an IPv4-translated IPv6 address"),
        ("::/96", "an IPv4-compatible IPv6 address"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
        ("100::/64", "a discard-only address"),
        ("2001::/32", "a Teredo address"),
        ("2002::/16", "a 6to4 address (deprecated by RFC 7526; it tunnels to an embedded IPv4 address)"),
        ("2001:2::/48", "a benchmarking address"),
        ("2001:10::/28", "an ORCHID address"),
        ("2001:20::/28", "an ORCHID address"),
        ("2001:db8::/32", "a documentation address"),
        ("3fff::/20", "a documentation address"),
        ("fc00::/7", "a unique-local address (includes AWS's fd00:ec2::254 metadata)"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
    ]
    .into_iter()
    .map(|(net, why)| (net.parse().expect("static CIDR parses"), why))
    .collect()
});

static GLOBAL_UNICAST_V6: LazyLock<Ipv6Net> = LazyLock::new(|| "2000::/3".parse().expect("static CIDR parses"));
static NAT64_V6: LazyLock<Ipv6Net> = LazyLock::new(|| "64:ff9b::/96".parse().expect("static CIDR parses"));

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{addr} is {why}; refused unless delivery.allow_networks lists it")]
    Special { addr: IpAddr, why: String },
    #[error("{addr} is in delivery.deny_networks ({net})")]
    Denied { addr: IpAddr, net: IpNet },
}

/// A destination the guard refused: a permanent failure, never retried.
#[derive(Debug, Clone, thiserror::Error)]
#[error("destination {host} refused: {refusal}")]
pub struct DestinationRefused {
    pub host: String,
    pub refusal: Refusal,
}

/// Which addresses deliveries may reach.
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl NetworkPolicy {
    pub fn new(allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        NetworkPolicy { allow, deny }
    }

    /// Ok if a delivery may connect to `addr`.
    pub fn check(&self, addr: IpAddr) -> Result<(), Refusal> {
        // ::ffff:10.0.0.1 is 10.0.0.1 on the wire, and NAT64's 64:ff9b::a00:1
        // reaches it through the translator: lists match every spelling.
        let canonical = addr.to_canonical();
        let carried = match addr {
            IpAddr::V6(v6) => nat64_carried(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let matches =
            |net: &&IpNet| net.contains(&addr) || net.contains(&canonical) || carried.is_some_and(|c| net.contains(&c));
        if let Some(net) = self.deny.iter().find(matches) {
            return Err(Refusal::Denied { addr, net: *net });
        }
        if self.allow.iter().any(|n| matches(&n)) {
            return Ok(());
        }
        match special(addr) {
            Some(why) => Err(Refusal::Special { addr, why }),
            None => Ok(()),
        }
    }
}

/// What makes `addr` a non-public destination, if anything does.
fn special(addr: IpAddr) -> Option<String> {
    match addr {
        IpAddr::V4(v4) => special_v4(v4).map(str::to_owned),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(v4: Ipv4Addr) -> Option<&'static str> {
    SPECIAL_V4.iter().find(|(net, _)| net.contains(&v4)).map(|(_, why)| *why)
}

/// The IPv4 address a well-known-prefix NAT64 address (RFC 6052) translates to.
fn nat64_carried(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    NAT64_V6.contains(&v6).then(|| Ipv4Addr::new(o[12], o[13], o[14], o[15]))
}

fn special_v6(v6: Ipv6Addr) -> Option<String> {
    // NAT64 reaches the IPv4 address it carries: judge that one.
    if let Some(v4) = nat64_carried(v6) {
        return special_v4(v4).map(|why| format!("a NAT64 address carrying {v4}, which is {why}"));
    }
    if let Some((_, why)) = SPECIAL_V6.iter().find(|(net, _)| net.contains(&v6)) {
        // IPv4-mapped, -compatible and -translated forms are refused whatever
        // they carry; say what that is.
        let o = v6.octets();
        let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
        return Some(match special_v4(tail) {
            Some(inner) if why.starts_with("an IPv4-") => format!("{why} carrying {tail}, which is {inner}"),
            _ => (*why).to_owned(),
        });
    }
    (!GLOBAL_UNICAST_V6.contains(&v6)).then(|| "outside IPv6 global unicast (2000::/3)".to_owned())
}

/// Turns a host name into addresses. The system resolver in production; tests
/// inject scripted answers.
pub trait Lookup: Send + Sync + 'static {
    fn lookup(&self, host: &str) -> BoxFuture<io::Result<Vec<IpAddr>>>;
}

/// The system resolver (`getaddrinfo` on tokio's blocking pool).
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, host: &str) -> BoxFuture<io::Result<Vec<IpAddr>>> {
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), 0)).await?.map(|a| a.ip()).collect()) })
    }
}

/// hyper's resolver: looks a name up once and returns its addresses only if
/// every one of them passes the policy.
#[derive(Clone)]
pub struct GuardedResolver {
    policy: Arc<NetworkPolicy>,
    lookup: Arc<dyn Lookup>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<NetworkPolicy>, lookup: Arc<dyn Lookup>) -> Self {
        GuardedResolver { policy, lookup }
    }

    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, BoxError> {
        let addrs = self.lookup.lookup(host).await?;
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{host} resolved to no address")).into());
        }
        for addr in &addrs {
            if let Err(refusal) = self.policy.check(*addr) {
                return Err(DestinationRefused { host: host.to_owned(), refusal }.into());
            }
        }
        Ok(addrs)
    }
}

impl Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addrs = this.resolve(name.as_str()).await?;
            // Port 0: hyper's connector sets the URL's port.
            Ok(addrs.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect::<Vec<_>>().into_iter())
        })
    }
}

/// Wraps the TCP connector to check hosts that are IP literals, which the
/// connector never passes to the resolver.
#[derive(Clone)]
pub struct GuardedConnector<C> {
    inner: C,
    policy: Arc<NetworkPolicy>,
}

impl<C> GuardedConnector<C> {
    pub fn new(inner: C, policy: Arc<NetworkPolicy>) -> Self {
        GuardedConnector { inner, policy }
    }
}

impl<C> Service<Uri> for GuardedConnector<C>
where
    C: Service<Uri>,
    C::Response: Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = BoxFuture<Result<C::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        if let Some(host) = uri.host()
            && let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>()
            && let Err(refusal) = self.policy.check(ip)
        {
            let err = DestinationRefused { host: host.to_owned(), refusal };
            return Box::pin(std::future::ready(Err(err.into())));
        }
        let connecting = self.inner.call(uri);
        Box::pin(async move { connecting.await.map_err(Into::into) })
    }
}

/// The guard's refusal somewhere in an error's chain of sources, if it is there.
pub fn find_refusal<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a DestinationRefused> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<DestinationRefused>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// Scripted DNS for tests: answers in order (the last one repeats), counting lookups.
#[cfg(test)]
pub(crate) struct Script {
    answers: std::sync::Mutex<Vec<Vec<IpAddr>>>,
    pub calls: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl Script {
    pub fn new(answers: &[&[&str]]) -> Arc<Script> {
        let answers = answers.iter().map(|a| a.iter().map(|s| s.parse().expect("ip")).collect()).collect();
        Arc::new(Script { answers: std::sync::Mutex::new(answers), calls: 0.into() })
    }
}

#[cfg(test)]
impl Lookup for Script {
    fn lookup(&self, _: &str) -> BoxFuture<io::Result<Vec<IpAddr>>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut a = self.answers.lock().expect("lock");
        let next = if a.len() > 1 { a.remove(0) } else { a[0].clone() };
        Box::pin(async move { Ok(next) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("CIDR")
    }

    /// The host of a URL as the client would see it, after the URL parser's
    /// normalisation, checked like the connector and resolver check it.
    fn check_url(policy: &NetworkPolicy, url: &str) -> Result<(), Refusal> {
        let u = url::Url::parse(url).expect("URL parses");
        let ip = match u.host().expect("host") {
            url::Host::Ipv4(v4) => IpAddr::V4(v4),
            url::Host::Ipv6(v6) => IpAddr::V6(v6),
            url::Host::Domain(d) => panic!("{url} is not an IP literal (host {d})"),
        };
        policy.check(ip)
    }

    #[test]
    fn hostile_literals_are_refused_by_default() {
        let p = NetworkPolicy::default();
        let hostile = [
            // loopback, in every spelling the URL parser accepts
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f.0.0.1/",
            "http://0177.0.0.1/",
            "http://0x7f000001/",
            "http://[::1]/",
            "http://[0:0:0:0:0:0:0:1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[::127.0.0.1]/",
            // cloud metadata and other link-local
            "http://169.254.169.254/latest/meta-data/",
            "http://0xa9fea9fe/",
            "http://2852039166/",
            "http://[::ffff:169.254.169.254]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:a9fe:a9fe::1]/",
            "http://[2002:808:808::1]/",
            "http://[fd00:ec2::254]/",
            "http://100.100.100.200/",
            "http://[fe80::1]/",
            "http://169.254.1.1/",
            // private, shared, special
            "http://10.0.0.1/",
            "http://172.16.0.1/",
            "http://172.31.255.255/",
            "http://192.168.1.1/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://0/",
            "http://255.255.255.255/",
            "http://224.0.0.1/",
            "http://239.255.255.250/",
            "http://240.0.0.1/",
            "http://192.0.0.192/",
            "http://198.18.0.1/",
            "http://[::]/",
            "http://[fc00::1]/",
            "http://[fec0::1]/",
            "http://[ff02::1]/",
            "http://[2001::1]/",
            "http://[2001:db8::1]/",
            "http://[::ffff:10.0.0.1]/",
            "http://[::ffff:0:10.0.0.1]/",
            "http://[64:ff9b:1::1]/",
        ];
        for url in hostile {
            assert!(check_url(&p, url).is_err(), "{url} must be refused");
        }
        for url in
            ["http://93.184.215.14/", "http://1.1.1.1/", "http://[2606:4700:4700::1111]/", "http://[64:ff9b::101:101]/"]
        {
            assert_eq!(check_url(&p, url), Ok(()), "{url} is public");
        }
    }

    #[test]
    fn refusals_say_what_the_address_is() {
        let p = NetworkPolicy::default();
        let e = check_url(&p, "http://169.254.169.254/").expect_err("metadata").to_string();
        assert!(e.contains("cloud metadata") && e.contains("delivery.allow_networks"), "{e}");
        let e = check_url(&p, "http://[64:ff9b::a00:1]/").expect_err("nat64").to_string();
        assert!(e.contains("NAT64") && e.contains("10.0.0.1") && e.contains("RFC 1918"), "{e}");
    }

    #[test]
    fn the_allow_list_opens_exactly_what_it_names_and_the_deny_list_wins() {
        let p = NetworkPolicy::new(vec![net("127.0.0.0/8"), net("10.1.0.0/16")], vec![net("10.1.2.3/32")]);
        assert_eq!(p.check("127.0.0.1".parse().expect("ip")), Ok(()));
        assert_eq!(p.check("::ffff:127.0.0.1".parse().expect("ip")), Ok(()), "the mapped form is the same address");
        assert_eq!(p.check("10.1.9.9".parse().expect("ip")), Ok(()));
        assert!(p.check("::1".parse().expect("ip")).is_err(), "IPv6 loopback was not allowed");
        assert!(p.check("10.2.0.1".parse().expect("ip")).is_err());
        assert!(matches!(p.check("10.1.2.3".parse().expect("ip")), Err(Refusal::Denied { .. })));
        let public_denied = NetworkPolicy::new(vec![], vec![net("1.1.1.0/24")]);
        assert!(public_denied.check("1.1.1.1".parse().expect("ip")).is_err());
        assert!(public_denied.check("64:ff9b::101:101".parse().expect("ip")).is_err(), "NAT64 of a denied address");
        let nat64_allowed = NetworkPolicy::new(vec![net("10.1.0.0/16")], vec![]);
        assert_eq!(nat64_allowed.check("64:ff9b::a01:101".parse().expect("ip")), Ok(()), "NAT64 of an allowed one");
    }

    #[tokio::test]
    async fn one_bad_answer_refuses_the_name() {
        let policy = Arc::new(NetworkPolicy::default());
        for answer in [
            &["10.0.0.1"][..],
            &["93.184.215.14", "10.0.0.1"],
            &["2606:4700::1", "fd00:ec2::254"],
            &["93.184.215.14", "::ffff:169.254.169.254"],
        ] {
            let r = GuardedResolver::new(policy.clone(), Script::new(&[answer]));
            let err = r.resolve("hooks.example.com").await.expect_err("refused");
            assert!(err.downcast_ref::<DestinationRefused>().is_some(), "{answer:?}: {err}");
        }
        let public = GuardedResolver::new(policy.clone(), Script::new(&[&["93.184.215.14", "2606:4700::1"]]));
        assert_eq!(public.resolve("hooks.example.com").await.expect("public").len(), 2);
        let empty = Script::new(&[&[]]);
        let err = GuardedResolver::new(policy, empty).resolve("x.example").await.expect_err("no address");
        assert!(err.to_string().contains("no address"), "{err}");
    }
}
