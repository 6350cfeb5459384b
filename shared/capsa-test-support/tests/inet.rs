//! The fake internet, seen from the host namespace (needs root and iproute2, like the VM tests).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use capsa_test_support::inet::FakeInternet;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

const TIMEOUT: Duration = Duration::from_secs(10);

/// `GET path` on port 80 of `addr`; the whole response (the server closes the connection).
fn http_get(addr: IpAddr, port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::new(addr, port), TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

fn query(name: &str, record_type: RecordType) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
    message.to_vec().unwrap()
}

fn resolve_udp(server: SocketAddr, name: &str) -> Message {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.set_read_timeout(Some(TIMEOUT)).unwrap();
    socket.send_to(&query(name, RecordType::A), server).unwrap();
    let mut buf = [0u8; 4096];
    let (n, _) = socket.recv_from(&mut buf).unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

fn resolve_tcp(server: SocketAddr, name: &str) -> Message {
    let mut stream = TcpStream::connect_timeout(&server, TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let message = query(name, RecordType::A);
    stream
        .write_all(&(message.len() as u16).to_be_bytes())
        .unwrap();
    stream.write_all(&message).unwrap();
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).unwrap();
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut reply).unwrap();
    Message::from_vec(&reply).unwrap()
}

fn a_records(message: &Message) -> Vec<(IpAddr, u32)> {
    message
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some((IpAddr::V4(a.0), record.ttl)),
            _ => None,
        })
        .collect()
}

fn exists(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn hosts_answer_http_and_dns_and_drop_removes_everything() {
    let mut inet = FakeInternet::start().unwrap();
    let a = inet.add_host("a.example.test").unwrap();
    let b = inet
        .add_host_with_ttl("B.example.test.", Duration::from_secs(7))
        .unwrap();
    assert_ne!(a, b);
    let subnet = inet.subnet();
    let prefix = subnet.strip_suffix(".0/24").unwrap();
    assert!(prefix.starts_with("198.18."), "{subnet}");
    assert!(a.to_string().starts_with(prefix), "{a} in {subnet}");

    // HTTP from the host namespace, through the veth, on both ports.
    for port in [80, 443] {
        let response = http_get(a, port, "/");
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.ends_with("\r\n\r\na.example.test"), "{response}");
    }
    assert!(http_get(b, 80, "/").ends_with("\r\n\r\nb.example.test"));
    let bytes = http_get(a, 80, "/bytes/100000");
    let body = bytes.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(body.len(), 100_000);
    assert!(http_get(a, 80, "/nope").starts_with("HTTP/1.1 404"));

    // /stream trickles lines and stays open.
    let mut stream = TcpStream::connect(SocketAddr::new(a, 80)).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(b"GET /stream HTTP/1.1\r\n\r\n").unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 1024];
    while !seen.contains("line 2\n") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(stream);

    // DNS: A records with their TTLs, NXDOMAIN for anything else, over UDP and TCP.
    let before = inet.dns_queries();
    let server = inet.dns_server();
    let reply = resolve_udp(server, "a.example.test");
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&reply), vec![(a, 300)]);
    let reply = resolve_tcp(server, "b.EXAMPLE.test");
    assert_eq!(a_records(&reply), vec![(b, 7)]);
    let reply = resolve_udp(server, "c.example.test");
    assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
    assert!(reply.answers.is_empty());
    assert_eq!(inet.dns_queries(), before + 3);
    assert!(
        inet.add_host("a.example.test").is_err(),
        "a name is added once"
    );

    let namespace = inet.namespace();
    let netns = namespace.file_name().unwrap().to_str().unwrap().to_owned();
    let veth = format!("cinet-{}", prefix.rsplit('.').next().unwrap());
    assert!(namespace.exists());
    assert!(exists(&["link", "show", &veth]));
    drop(inet);
    assert!(!namespace.exists(), "{} left behind", namespace.display());
    assert!(!exists(&["netns", "pids", &netns]), "{netns} left behind");
    assert!(!exists(&["link", "show", &veth]), "{veth} left behind");
    // (No connect to `a` now: without the veth its route is the host's default one, off this
    // machine.)
    let route = Command::new("ip")
        .args(["-4", "route", "show", &subnet])
        .output()
        .unwrap();
    assert!(route.stdout.is_empty(), "route to {subnet} left behind");
}

#[test]
fn two_fixtures_get_different_subnets() {
    let one = FakeInternet::start().unwrap();
    let two = FakeInternet::start().unwrap();
    assert_ne!(one.subnet(), two.subnet());
    assert_ne!(one.namespace(), two.namespace());
}
