//! A run with no coordinator, checked by anyone who holds its ticket and a copy of its
//! certified chain: no signer to trust. Each height's certificate must carry the
//! precommit signatures of more than two thirds of the committee the chain so far seats
//! for it (`Replica::seats`) for that very value; the
//! value is then executed again from version 0 through the run core, from the signed
//! updates stored with it, and must be what was certified, bit for bit (the accepted
//! units and their weights, the punished equivocators, the new version's hash). The
//! credit every member holds follows from the certified values alone: what
//! [`replay`] ends with is the run's ledger, rebuilt.
//!
//! A chain file ([`ChainWriter`], [`read_chain`]) is each certified height in turn, as
//! a peer sends it to one that catches up (`crate::wire`), length first.

use std::io::{Read, Seek, Write};
use std::path::Path;

use agree::Committee;

use crate::node::{Certified, Message};
use crate::replica::{Replica, RunSpec};

/// A chain file's first bytes (the `1` is its format's version).
pub const MAGIC: &[u8; 16] = b"hivetrain-chain1";

/// Why a chain is not the run's.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("height {height}: {why}")]
    Height { height: u64, why: String },
    #[error("the chain file: {0}")]
    File(String),
}

/// What a chain replays to.
#[derive(Debug)]
pub struct Audited {
    /// The last version, its parameters, hash and every member's credit.
    pub replica: Replica,
    /// Heights checked.
    pub heights: u64,
}

/// Replays `chain` from `genesis`: every certificate checked against the members,
/// every value executed again. Stops at the first height that is not certified, not the
/// next, or not what its updates compute.
pub fn replay(
    spec: &RunSpec,
    genesis: Replica,
    chain: impl IntoIterator<Item = Result<Certified, AuditError>>,
    mut on_height: impl FnMut(&Certified, &Replica),
) -> Result<Audited, AuditError> {
    let keys: Vec<_> = spec
        .members
        .iter()
        .filter_map(|m| ed25519_dalek::VerifyingKey::from_bytes(&m.0).ok())
        .collect();
    Committee::new(&keys)
        .filter(|c| c.len() == spec.members.len())
        .ok_or_else(|| AuditError::File("the run's members are not a committee".into()))?;
    let mut replica = genesis;
    let mut heights = 0;
    for certified in chain {
        let certified = certified?;
        let height = replica.version() + 1;
        let fail = |why: &str| AuditError::Height {
            height,
            why: why.to_owned(),
        };
        // Who the chain so far seats for this height.
        let committee = replica.committee(spec).map_err(|e| fail(&e.to_string()))?;
        let decision = &certified.decision;
        if decision.height.0 != height {
            return Err(fail(&format!(
                "the chain holds height {} here",
                decision.height.0
            )));
        }
        if !committee.certifies(decision) {
            return Err(fail(
                "its certificate is not signed by more than two thirds of the members for this value",
            ));
        }
        if certified.updates.len() != decision.value.updates.len() {
            return Err(fail("it is stored without the updates its value names"));
        }
        for (bytes, address) in certified.updates.iter().zip(&decision.value.updates) {
            if !protocol::update::stored_intact(bytes, address) {
                return Err(fail("a stored update is not the one its value names"));
            }
        }
        let slices: Vec<&[u8]> = certified.updates.iter().map(|b| b.as_slice()).collect();
        let executed = replica
            .execute(spec, &slices, &decision.value.evidence)
            .map_err(|e| fail(&format!("its updates do not execute: {e}")))?;
        if executed.value != decision.value {
            return Err(fail(
                "its updates compute another value than the one certified (units, weights or version hash)",
            ));
        }
        replica = executed.replica;
        heights += 1;
        on_height(&certified, &replica);
    }
    Ok(Audited { replica, heights })
}

/// Appends certified heights to a chain file.
pub struct ChainWriter {
    file: std::fs::File,
}

impl ChainWriter {
    /// A new chain file at `path` (one already there is replaced).
    pub fn create(path: &Path) -> std::io::Result<ChainWriter> {
        let mut file = std::fs::File::create(path)?;
        file.write_all(MAGIC)?;
        Ok(ChainWriter { file })
    }

    /// The chain file at `path`, cut to its first `len` bytes (what [`ChainReader`] read
    /// whole: a height cut short by a crash goes), to append to.
    pub fn resume(path: &Path, len: u64) -> std::io::Result<ChainWriter> {
        let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(len)?;
        file.seek(std::io::SeekFrom::End(0))?;
        Ok(ChainWriter { file })
    }

    /// Writes one height and flushes it to the file.
    pub fn append(&mut self, certified: &Certified) -> std::io::Result<()> {
        let bytes = crate::wire::to_bytes(&Message::Chain(vec![certified.clone()]));
        self.file.write_all(&(bytes.len() as u64).to_le_bytes())?;
        self.file.write_all(&bytes)?;
        self.file.flush()
    }
}

/// The heights of a chain file, in order, each read (and bounded: `update_max` bytes an
/// update, `wire::MESSAGE_BYTES_MAX` a height) only when the one before was checked. A
/// height cut short ends it with an error saying so (`cut short`).
pub struct ChainReader {
    file: std::io::BufReader<std::fs::File>,
    update_max: usize,
    /// Bytes of the file read as whole heights (the magic included).
    whole: u64,
    done: bool,
}

impl ChainReader {
    pub fn open(path: &Path, update_max: usize) -> Result<ChainReader, AuditError> {
        let io = |e: std::io::Error| AuditError::File(format!("{}: {e}", path.display()));
        let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
        let mut magic = [0u8; 16];
        file.read_exact(&mut magic).map_err(io)?;
        if &magic != MAGIC {
            return Err(AuditError::File(format!(
                "{} is not a hivetrain chain file",
                path.display()
            )));
        }
        Ok(ChainReader {
            file,
            update_max,
            whole: MAGIC.len() as u64,
            done: false,
        })
    }

    /// Bytes read as whole heights so far.
    pub fn whole_bytes(&self) -> u64 {
        self.whole
    }

    fn next_height(&mut self) -> Option<Result<Certified, AuditError>> {
        let mut len = [0u8; 8];
        match self.file.read_exact(&mut len) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // Nothing, or part of a length: the end (a part is a height cut short).
                return match self.file.get_ref().metadata() {
                    Ok(m) if m.len() > self.whole => Some(Err(AuditError::File(CUT_SHORT.into()))),
                    _ => None,
                };
            }
            Err(e) => return Some(Err(AuditError::File(e.to_string()))),
            Ok(()) => {}
        }
        let n = u64::from_le_bytes(len);
        if n > crate::wire::MESSAGE_BYTES_MAX as u64 {
            return Some(Err(AuditError::File(format!("a height of {n} bytes"))));
        }
        let mut bytes = vec![0u8; n as usize];
        if let Err(e) = self.file.read_exact(&mut bytes) {
            return Some(Err(AuditError::File(format!("{CUT_SHORT}: {e}"))));
        }
        match crate::wire::from_bytes(&bytes, self.update_max) {
            Ok(Message::Chain(mut heights)) if heights.len() == 1 => {
                self.whole += 8 + n;
                Some(Ok(heights.pop().expect("one")))
            }
            _ => Some(Err(AuditError::File(
                "a height that does not decode".into(),
            ))),
        }
    }
}

/// What a chain file's last height says when a crash cut it short.
pub const CUT_SHORT: &str = "cut short";

impl Iterator for ChainReader {
    type Item = Result<Certified, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_height();
        self.done = !matches!(item, Some(Ok(_)));
        item
    }
}

/// The heights of the chain file at `path` ([`ChainReader`]).
pub fn read_chain(path: &Path, update_max: usize) -> Result<ChainReader, AuditError> {
    ChainReader::open(path, update_max)
}
