//! IPv4 subnets and the /30 slots carved out of them: one per VM (its point-to-point link
//! to the namespace) and one per vm-pool (the veth between the namespace and the host).

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network (`a.b.c.d/len`, host bits zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// The network of `addr/prefix` (host bits cleared).
    pub fn containing(addr: Ipv4Addr, prefix: u8) -> Ipv4Net {
        Ipv4Net {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        }
    }

    fn first(&self) -> u32 {
        u32::from(self.addr)
    }

    fn last(&self) -> u32 {
        self.first() | !mask(self.prefix)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == self.first()
    }

    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.first() <= other.last() && other.first() <= self.last()
    }

    /// How many /30 links it holds.
    pub fn slots(&self) -> u32 {
        if self.prefix > 30 {
            0
        } else {
            1u32.checked_shl(u32::from(30 - self.prefix))
                .unwrap_or(u32::MAX)
        }
    }

    /// The `k`th /30 link: (its network, the near end `.1`, the far end `.2`).
    pub fn slot(&self, k: u32) -> (Ipv4Net, Ipv4Addr, Ipv4Addr) {
        let base = self.first() + 4 * k;
        (
            Ipv4Net {
                addr: Ipv4Addr::from(base),
                prefix: 30,
            },
            Ipv4Addr::from(base + 1),
            Ipv4Addr::from(base + 2),
        )
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Ipv4Net {
    type Err = String;

    fn from_str(s: &str) -> Result<Ipv4Net, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not an IPv4 CIDR like 100.80.0.0/16"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{s:?}: address: {e}"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to 32"))?;
        let net = Ipv4Net::containing(addr, prefix);
        if net.addr != addr {
            return Err(format!("{s:?} has host bits set (the network is {net})"));
        }
        Ok(net)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The /30 slots of a subnet in use, lowest free first.
#[derive(Debug)]
pub struct Slots {
    count: u32,
    used: BTreeSet<u32>,
}

impl Slots {
    pub fn new(subnet: &Ipv4Net) -> Slots {
        Slots {
            count: subnet.slots(),
            used: BTreeSet::new(),
        }
    }

    pub fn take(&mut self) -> Option<u32> {
        let k = (0..self.count).find(|k| !self.used.contains(k))?;
        self.used.insert(k);
        Some(k)
    }

    pub fn release(&mut self, k: u32) {
        self.used.remove(&k);
    }
}

/// A 32-bit FNV-1a hash: stable names and offsets derived from a path or name.
pub fn fnv32(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks_and_overlaps() {
        let n: Ipv4Net = "100.80.0.0/16".parse().unwrap();
        assert_eq!(n.to_string(), "100.80.0.0/16");
        assert!(n.contains("100.80.255.1".parse().unwrap()));
        assert!(!n.contains("100.81.0.1".parse().unwrap()));
        let err = "100.80.0.1/16".parse::<Ipv4Net>().unwrap_err();
        assert!(
            err.contains("host bits") && err.contains("100.80.0.0/16"),
            "{err}"
        );
        assert!("100.80.0.0".parse::<Ipv4Net>().is_err());
        assert!("100.80.0.0/33".parse::<Ipv4Net>().is_err());
        assert!("fd00::/8".parse::<Ipv4Net>().is_err());
        let inside: Ipv4Net = "100.80.4.0/30".parse().unwrap();
        let apart: Ipv4Net = "100.81.0.0/16".parse().unwrap();
        let all: Ipv4Net = "0.0.0.0/0".parse().unwrap();
        assert!(n.overlaps(&inside) && inside.overlaps(&n) && all.overlaps(&n));
        assert!(!n.overlaps(&apart));
        assert_eq!(all.slots(), 1 << 30);
        assert_eq!(inside.slots(), 1);
        assert_eq!("10.0.0.0/31".parse::<Ipv4Net>().unwrap().slots(), 0);
    }

    #[test]
    fn slots_are_point_to_point_30s_reused_lowest_first() {
        let n: Ipv4Net = "100.80.0.0/28".parse().unwrap();
        let (net, near, far) = n.slot(2);
        assert_eq!(net.to_string(), "100.80.0.8/30");
        assert_eq!(
            (near.to_string(), far.to_string()),
            ("100.80.0.9".into(), "100.80.0.10".into())
        );
        let mut slots = Slots::new(&n);
        assert_eq!(
            (slots.take(), slots.take(), slots.take(), slots.take()),
            (Some(0), Some(1), Some(2), Some(3))
        );
        assert_eq!(slots.take(), None, "a /28 holds four /30s");
        slots.release(1);
        assert_eq!(slots.take(), Some(1));
    }
}
