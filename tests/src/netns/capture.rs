//! Recording what crosses the bridge ([`Capture`]) and reading the TCP
//! segments out of the frames ([`tcp_segment`]). Only observes: it never
//! sends a frame.

use std::net::{IpAddr, SocketAddr};

use super::START_PATIENCE;
use super::lab::Lab;
use super::tools::Tools;
use crate::process::ChildProcess;

/// Prints every frame the `wire` namespace receives (not the copies it
/// sends on), in hex, one per line, after a `ready` line.
const CAPTURE: &str = r#"
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
print("ready", flush=True)
while True:
    frame, address = s.recvfrom(65535)
    if address[2] != socket.PACKET_OUTGOING:
        print(frame.hex(), flush=True)
"#;

/// A raw packet capture on every port of the bridge (a python3 AF_PACKET
/// socket in the `wire` namespace); stopped when dropped.
#[derive(Debug)]
pub struct Capture {
    process: ChildProcess,
}

/// One TCP segment seen on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

impl Capture {
    pub(super) async fn start(lab: &Lab) -> anyhow::Result<Capture> {
        let tools = Tools::get().map_err(anyhow::Error::msg)?;
        let mut command = lab.wire().command(&tools.python3);
        command.args(["-u", "-c", CAPTURE]);
        let mut process = ChildProcess::spawn("capture", command, &lab.log("capture"))?;
        // Its log is frames in hex: nothing worth printing.
        process.set_tail_on_drop(false);
        process.wait_for_log("ready", START_PATIENCE).await?;
        Ok(Capture { process })
    }

    /// Every TCP segment captured so far, in order.
    pub fn segments(&self) -> Vec<Segment> {
        self.process
            .log()
            .lines()
            .filter_map(decode_hex)
            .filter_map(|frame| tcp_segment(&frame))
            .collect()
    }
}

fn decode_hex(line: &str) -> Option<Vec<u8>> {
    let line = line.trim();
    if !line.len().is_multiple_of(2) || line.len() < 28 {
        return None;
    }
    (0..line.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(line.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The TCP segment in an Ethernet frame (IPv4, or IPv6 without extension
/// headers), if it holds one.
pub fn tcp_segment(frame: &[u8]) -> Option<Segment> {
    const TCP: u8 = 6;
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let header_len = usize::from(ip.first()? & 0x0f) * 4;
            let total_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if *ip.get(9)? != TCP || header_len < 20 {
                return None;
            }
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            let tcp = ip.get(header_len..total_len.min(ip.len()))?;
            (IpAddr::from(src), IpAddr::from(dst), tcp)
        }
        0x86dd => {
            let payload_len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            if *ip.get(6)? != TCP {
                return None;
            }
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let tcp = ip.get(40..(40 + payload_len).min(ip.len()))?;
            (IpAddr::from(src), IpAddr::from(dst), tcp)
        }
        _ => return None,
    };
    let src_port = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dst_port = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        src: SocketAddr::new(src, src_port),
        dst: SocketAddr::new(dst, dst_port),
        payload: tcp.get(data_offset..)?.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame from 192.0.2.1:40000 to
    /// 192.0.2.2:8080 carrying `payload`, with Ethernet padding after it.
    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend([0x08, 0x00]);
        let total = 20 + 20 + payload.len();
        f.extend([
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            6,
            0,
            0,
        ]);
        f.extend([192, 0, 2, 1, 192, 0, 2, 2]);
        f.extend(40000u16.to_be_bytes());
        f.extend(8080u16.to_be_bytes());
        f.extend([0; 8]);
        f.extend([0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        f.extend(payload);
        f.extend([0; 6]);
        f
    }

    #[test]
    fn reads_tcp_segments_from_frames() {
        let f = frame(b"GET / HTTP/1.1\r\n");
        let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
        let decoded = decode_hex(&hex).unwrap();
        assert_eq!(decoded, f);
        let s = tcp_segment(&decoded).unwrap();
        assert_eq!(s.src, "192.0.2.1:40000".parse().unwrap());
        assert_eq!(s.dst, "192.0.2.2:8080".parse().unwrap());
        assert_eq!(s.payload, b"GET / HTTP/1.1\r\n");
        assert!(tcp_segment(&f[..20]).is_none());
        assert!(decode_hex("ready").is_none());
    }
}
