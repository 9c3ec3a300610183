//! A run ticket: the string a run's creator shares so that its peers find the run and
//! each other. It names the run (its config, and its corpus and tokenizer by BLAKE3
//! hash: each peer brings the files, and a file with other bytes is refused), the members
//! the creator admitted (their keys, and where each listens when the creator knows it),
//! the relay they meet at when a NAT stands between them, and how many versions to
//! certify. Whoever holds the ticket can read all of it: it names no secret.
//!
//! A ticket is `hivetrain-run1:` and the URL-safe base64 of its JSON; [`Ticket::parse`]
//! refuses anything longer than [`TICKET_BYTES_MAX`], and a run no peer could start (no
//! members, too many, one twice, a config its own checks refuse).

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use iroh::EndpointAddr;
use protocol::WorkerId;
use runner::CoordinatorConfig;
use serde::{Deserialize, Serialize};

use crate::relay::RelayRef;

/// What a ticket starts with (the `1` is its format's version).
pub const PREFIX: &str = "hivetrain-run1:";

/// The longest ticket read, in characters.
pub const TICKET_BYTES_MAX: usize = 256 * 1024;

/// Addresses one member may list, at most.
pub const ADDRS_MAX: usize = 8;

/// Longest determinism class a ticket names (`engine::cpu_class()` is about 120 bytes).
pub const CLASS_BYTES_MAX: usize = 512;

/// A file of the run, by name (a hint for people) and by BLAKE3 hash (what counts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub name: String,
    /// 64 hex digits.
    pub blake3: String,
}

impl FileRef {
    /// `bytes`, named `name`.
    pub fn of(name: &str, bytes: &[u8]) -> FileRef {
        FileRef {
            name: name.to_owned(),
            blake3: blake3::hash(bytes).to_hex().to_string(),
        }
    }

    /// Whether `bytes` are this file.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        blake3::hash(bytes).to_hex().as_str() == self.blake3
    }
}

/// A member the creator admitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its key (64 hex digits): its address on the network, and the key that signs its
    /// updates and votes.
    pub id: String,
    /// Sockets it listens on, if the creator knows them (else it is found through the
    /// relay).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addrs: Vec<SocketAddr>,
}

/// A run with no coordinator, as its creator shares it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    /// The run (its `corpus` and `tokenizer` paths are each peer's own).
    pub config: CoordinatorConfig,
    pub corpus: FileRef,
    pub tokenizer: FileRef,
    /// Versions to certify; a peer stops at the last.
    pub versions: u64,
    pub members: Vec<Member>,
    /// The run's determinism class (`engine::cpu_class()` of the machines it is for):
    /// sampled units are re-run by other members and compared within
    /// `config.spot_check.tolerance`, so a member of another class joins only a run whose
    /// tolerance covers the difference between classes.
    pub class: String,
    /// The relay every member keeps a connection to (`hivetrain relay`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayRef>,
}

/// Why a ticket was refused.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    #[error("a run ticket starts with {PREFIX:?}: this text does not")]
    Prefix,
    #[error("a run ticket is at most {TICKET_BYTES_MAX} characters: this one is {0}")]
    TooLong(usize),
    #[error("the ticket is damaged (cut short when copied?): {0}")]
    Damaged(String),
    #[error("the ticket's run is not one a peer can start: {0}")]
    Invalid(String),
}

impl Ticket {
    /// The ticket as the string to share.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a ticket serializes");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    /// Reads a ticket string (surrounding whitespace ignored), checking what any peer
    /// would need of it.
    pub fn parse(text: &str) -> Result<Ticket, TicketError> {
        let text = text.trim();
        if text.len() > TICKET_BYTES_MAX {
            return Err(TicketError::TooLong(text.len()));
        }
        let body = text.strip_prefix(PREFIX).ok_or(TicketError::Prefix)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| TicketError::Damaged(e.to_string()))?;
        let ticket: Ticket =
            serde_json::from_slice(&json).map_err(|e| TicketError::Damaged(e.to_string()))?;
        ticket.check()?;
        Ok(ticket)
    }

    /// Refuses a run no peer could start.
    pub fn check(&self) -> Result<(), TicketError> {
        let invalid = |m: String| Err(TicketError::Invalid(m));
        if self.members.is_empty() || self.members.len() > agree::COMMITTEE_MAX {
            return invalid(format!(
                "it names {} members: a run has 1 to {}",
                self.members.len(),
                agree::COMMITTEE_MAX
            ));
        }
        let ids = self.member_ids()?;
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != ids.len() {
            return invalid("a member is named twice".into());
        }
        if let Some(m) = self.members.iter().find(|m| m.addrs.len() > ADDRS_MAX) {
            return invalid(format!(
                "member {} lists {} addresses: at most {ADDRS_MAX}",
                m.id,
                m.addrs.len()
            ));
        }
        if self.versions == 0 {
            return invalid("it certifies no versions".into());
        }
        if self.class.is_empty() || self.class.len() > CLASS_BYTES_MAX {
            return invalid(format!(
                "its determinism class is {} bytes: 1 to {CLASS_BYTES_MAX}",
                self.class.len()
            ));
        }
        for file in [&self.corpus, &self.tokenizer] {
            if file.blake3.len() != 64 || hex::decode(&file.blake3).is_err() {
                return invalid(format!("{:?} is not named by a BLAKE3 hash", file.name));
            }
        }
        if let Some(relay) = &self.relay {
            relay.check().map_err(TicketError::Invalid)?;
        }
        self.config
            .check()
            .map_err(|e| TicketError::Invalid(e.to_string()))
    }

    /// The members' keys, in the ticket's order.
    pub fn member_ids(&self) -> Result<Vec<WorkerId>, TicketError> {
        self.members
            .iter()
            .map(|m| {
                WorkerId::parse(&m.id)
                    .filter(WorkerId::is_public_key)
                    .ok_or_else(|| {
                        TicketError::Invalid(format!("{:?} is not a member's public key", m.id))
                    })
            })
            .collect()
    }

    /// Where each member is reached: its key, the sockets it lists, and the relay.
    pub fn addrs(&self) -> Result<Vec<(WorkerId, EndpointAddr)>, TicketError> {
        let relay = match &self.relay {
            Some(r) => Some(r.relay_url().map_err(TicketError::Invalid)?),
            None => None,
        };
        let ids = self.member_ids()?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, member) in ids.into_iter().zip(&self.members) {
            let endpoint = iroh::EndpointId::from_bytes(&id.0)
                .map_err(|_| TicketError::Invalid(format!("{} is not a public key", member.id)))?;
            let mut addr = EndpointAddr::new(endpoint);
            for socket in &member.addrs {
                addr = addr.with_ip_addr(*socket);
            }
            if let Some(relay) = &relay {
                addr = addr.with_relay_url(relay.clone());
            }
            out.push((id, addr));
        }
        Ok(out)
    }

    /// The run's name: the first 16 hex digits of the BLAKE3 hash of the ticket's bytes
    /// but `versions` (a ticket for more versions of the same run extends it: its members
    /// resume from their chains).
    pub fn run_id(&self) -> String {
        let json = serde_json::to_vec(&Ticket {
            versions: 0,
            ..self.clone()
        })
        .expect("a ticket serializes");
        blake3::hash(&json).to_hex()[..16].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(members: usize) -> Ticket {
        let members = (0..members)
            .map(|i| Member {
                id: WorkerId::of(&peer::local::key(7, i)).to_string(),
                addrs: vec![format!("127.0.0.1:{}", 7000 + i).parse().expect("addr")],
            })
            .collect();
        Ticket {
            config: CoordinatorConfig::default(),
            corpus: FileRef::of("corpus.txt", b"text"),
            tokenizer: FileRef::of("tokenizer.json", b"{}"),
            versions: 3,
            members,
            class: "cpu/test".into(),
            relay: Some(RelayRef::url_only("http://127.0.0.1:3340")),
        }
    }

    /// What a ticket string may be: each case a ticket (or text), and the error's words
    /// (`None`: it reads back as the same ticket).
    fn check(text: &str, want: Option<&str>, original: &Ticket) {
        match (Ticket::parse(text), want) {
            (Ok(t), None) => assert_eq!(&t, original),
            (Err(e), Some(words)) => assert!(e.to_string().contains(words), "{e}"),
            (got, want) => panic!("{got:?}, wanted {want:?}"),
        }
    }

    #[test]
    fn tickets_read_back_and_bad_ones_are_refused_with_a_sentence() {
        let good = ticket(4);
        let encoded = good.encode();
        check(&encoded, None, &good);
        check(&format!("  {encoded}\n"), None, &good);
        check("hello", Some("starts with"), &good);
        check(&encoded[..encoded.len() - 10], Some("damaged"), &good);
        check(&"x".repeat(TICKET_BYTES_MAX + 1), Some("at most"), &good);
        type Spoil = Box<dyn Fn(&mut Ticket)>;
        let cases: Vec<(Spoil, &str)> = vec![
            (Box::new(|t| t.members.clear()), "1 to"),
            (
                Box::new(|t| {
                    let m = t.members[0].clone();
                    t.members.push(m)
                }),
                "twice",
            ),
            (Box::new(|t| t.members[1].id = "abc".into()), "public key"),
            (Box::new(|t| t.class.clear()), "determinism class"),
            (
                Box::new(|t| t.class = "c".repeat(CLASS_BYTES_MAX + 1)),
                "determinism class",
            ),
            (
                Box::new(|t| t.members[0].addrs = vec![t.members[0].addrs[0]; ADDRS_MAX + 1]),
                "addresses",
            ),
            (Box::new(|t| t.versions = 0), "no versions"),
            (Box::new(|t| t.corpus.blake3 = "zz".into()), "BLAKE3"),
            (
                Box::new(|t| t.relay = Some(RelayRef::url_only("not a url"))),
                "relay URL",
            ),
            (
                Box::new(|t| {
                    t.relay = Some(RelayRef {
                        quic_port: Some(7842),
                        ..RelayRef::url_only("http://127.0.0.1:3340")
                    })
                }),
                "both its port and its certificate",
            ),
            (Box::new(|t| t.config.batch = 0), "not one a peer can start"),
        ];
        for (spoil, words) in cases {
            let mut bad = ticket(4);
            spoil(&mut bad);
            check(&bad.encode(), Some(words), &good);
        }
    }

    #[test]
    fn a_ticket_names_every_member_with_its_sockets_and_the_relay() {
        let t = ticket(3);
        let addrs = t.addrs().expect("addrs");
        assert_eq!(addrs.len(), 3);
        for ((id, addr), member) in addrs.iter().zip(&t.members) {
            assert_eq!(id.to_string(), member.id);
            assert_eq!(addr.ip_addrs().copied().collect::<Vec<_>>(), member.addrs);
            assert_eq!(addr.relay_urls().count(), 1);
        }
        assert_eq!(t.run_id(), ticket(3).run_id());
        assert_ne!(t.run_id(), ticket(4).run_id());
        let longer = Ticket {
            versions: 30,
            ..t.clone()
        };
        assert_eq!(longer.run_id(), t.run_id());
    }
}
