//! An address or a range of them (`10.0.0.5`, `10.0.0.0/24`, `fd00:1::/64`), as
//! `admin.proxy_addresses` takes them: a load balancer whose machines come and go has a
//! subnet, not a list of addresses.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Addresses whose first `prefix` bits are `network`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix: u8,
}

impl IpRange {
    /// Whether `ip` is in the range; an IPv4 address written as IPv6 (`::ffff:a.b.c.d`,
    /// as a dual-stack listener sees it) counts as the IPv4 one.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => masked(u32::from(ip).into(), 32, self.prefix) == u32::from(net).into(),
            (IpAddr::V6(net), IpAddr::V6(ip)) => masked(u128::from(ip), 128, self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

/// `bits` (an address of `width` bits) with all but its first `prefix` bits cleared.
fn masked(bits: u128, width: u8, prefix: u8) -> u128 {
    match width - prefix {
        0 => bits,
        host if host >= 128 => 0,
        host => bits >> host << host,
    }
}

impl From<IpAddr> for IpRange {
    fn from(ip: IpAddr) -> Self {
        let ip = ip.to_canonical();
        Self { network: ip, prefix: if ip.is_ipv4() { 32 } else { 128 } }
    }
}

impl FromStr for IpRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let ip: IpAddr = address.parse().map_err(|_| {
            format!("`{text}` is not an IP address or a range of them (10.0.0.5, 10.0.0.0/24, fd00::/64)")
        })?;
        let whole = Self::from(ip);
        let Some(prefix) = prefix else { return Ok(whole) };
        let width = whole.prefix;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= width)
            .ok_or_else(|| format!("`{text}`: the prefix length after / is 0 to {width}"))?;
        if prefix == 0 {
            return Err(format!(
                "`{text}` is every address: any client could then name itself a new address per login"
            ));
        }
        let bits = match whole.network {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        let network_bits = masked(bits, width, prefix);
        if network_bits != bits {
            let network = match whole.network {
                IpAddr::V4(_) => IpAddr::from((network_bits as u32).to_be_bytes()),
                IpAddr::V6(_) => IpAddr::from(network_bits.to_be_bytes()),
            };
            return Err(format!(
                "`{text}` has bits set past its prefix: write the range as {network}/{prefix}, or the one address as {ip}"
            ));
        }
        Ok(Self { network: whole.network, prefix })
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl<'de> serde::Deserialize<'de> for IpRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_address_is_a_range_of_one() {
        let one: IpRange = "10.0.0.5".parse().unwrap();
        assert!(one.contains(ip("10.0.0.5")));
        assert!(one.contains(ip("::ffff:10.0.0.5")), "as a dual-stack listener sees it");
        assert!(!one.contains(ip("10.0.0.6")));
        let v6: IpRange = "fd00::1".parse().unwrap();
        assert!(v6.contains(ip("fd00::1")) && !v6.contains(ip("fd00::2")));
    }

    /// A load balancer whose machines come and go is named by its subnet.
    #[test]
    fn a_range_holds_its_subnet_and_nothing_else() {
        let subnet: IpRange = "10.1.2.0/24".parse().unwrap();
        for inside in ["10.1.2.0", "10.1.2.77", "10.1.2.255", "::ffff:10.1.2.9"] {
            assert!(subnet.contains(ip(inside)), "{inside}");
        }
        for outside in ["10.1.3.0", "10.1.1.255", "11.1.2.7", "::1", "fd00::a01:207"] {
            assert!(!subnet.contains(ip(outside)), "{outside}");
        }
        let v6: IpRange = "fd00:1::/64".parse().unwrap();
        assert!(v6.contains(ip("fd00:1::abcd:1")));
        assert!(!v6.contains(ip("fd00:2::1")) && !v6.contains(ip("10.0.0.1")));
        let odd: IpRange = "192.168.4.0/22".parse().unwrap();
        assert!(odd.contains(ip("192.168.7.255")) && !odd.contains(ip("192.168.8.0")));
        assert!("10.0.0.0/8".parse::<IpRange>().unwrap().contains(ip("10.255.0.1")));
    }

    #[test]
    fn a_mistyped_range_is_refused_saying_what_to_write() {
        let refusal = |text: &str| text.parse::<IpRange>().unwrap_err();
        assert!(refusal("10.0.0.5/24").contains("10.0.0.0/24"), "{}", refusal("10.0.0.5/24"));
        assert!(refusal("10.0.0.0/33").contains("0 to 32"));
        assert!(refusal("fd00::/129").contains("0 to 128"));
        assert!(refusal("0.0.0.0/0").contains("every address"));
        assert!(refusal("10.0.0.0/x").contains("prefix length"));
        assert!(refusal("proxy.example.jp").contains("not an IP address"));
        assert!(refusal("10.0.0/24").contains("not an IP address"));
    }
}
