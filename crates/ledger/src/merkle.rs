//! A Merkle tree over the ledger's entry hashes, shaped as in RFC 9162 (Certificate
//! Transparency 2.0, section 2.1) with blake3 in place of SHA-256: leaves hashed with a
//! 0x00 prefix, inner nodes with 0x01, a tree of n leaves split at the largest power of
//! two below n. An inclusion proof is the audit path of section 2.1.3, checked with its
//! verification algorithm, so a contributor holding a signed tree head can check an entry
//! of theirs without trusting the server.

use serde::{Deserialize, Serialize};

use crate::Digest;

fn leaf(entry_hash: &Digest) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(&[0]);
    h.update(&entry_hash.0);
    Digest(*h.finalize().as_bytes())
}

fn node(left: &Digest, right: &Digest) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(&[1]);
    h.update(&left.0);
    h.update(&right.0);
    Digest(*h.finalize().as_bytes())
}

/// The largest power of two strictly below `n` (n >= 2).
fn split(n: usize) -> usize {
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The root over `entries` (the entry hashes, in order). The empty tree's root is the
/// hash of nothing.
pub fn root(entries: &[Digest]) -> Digest {
    match entries.len() {
        0 => Digest(*blake3::hash(&[]).as_bytes()),
        1 => leaf(&entries[0]),
        n => {
            let k = split(n);
            node(&root(&entries[..k]), &root(&entries[k..]))
        }
    }
}

/// The tree kept as it grows: the hash of every perfect subtree, by height, so that a
/// root or an audit path of any size up to the current one costs O(log^2 n) hashes
/// instead of hashing every entry again. Agrees with [`root`] and [`inclusion_proof`].
#[derive(Clone, Debug, Default)]
pub struct Tree {
    /// `levels[k][i]`: the hash of the perfect subtree over leaves `[i 2^k, (i + 1) 2^k)`.
    levels: Vec<Vec<Digest>>,
}

impl Tree {
    /// Leaves so far.
    pub fn len(&self) -> usize {
        self.levels.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds the next entry's hash: one leaf, and every subtree it completes.
    pub fn push(&mut self, entry_hash: &Digest) {
        let mut hash = leaf(entry_hash);
        for k in 0.. {
            if self.levels.len() == k {
                self.levels.push(Vec::new());
            }
            let level = &mut self.levels[k];
            level.push(hash);
            let n = level.len();
            if n % 2 == 1 {
                break;
            }
            hash = node(&level[n - 2], &level[n - 1]);
        }
    }

    /// The root of the tree of the first `size` entries (`size` at most [`Tree::len`]).
    pub fn root(&self, size: usize) -> Digest {
        match size.min(self.len()) {
            0 => Digest(*blake3::hash(&[]).as_bytes()),
            n => self.range(0, n),
        }
    }

    /// The audit path of entry `index` in the tree of the first `size` entries; `None`
    /// if `index` is not below `size` or `size` is past [`Tree::len`].
    pub fn inclusion_proof(&self, index: usize, size: usize) -> Option<InclusionProof> {
        (index < size && size <= self.len()).then(|| InclusionProof {
            index: index as u64,
            size: size as u64,
            path: self.path(0, size, index),
        })
    }

    /// The hash of leaves `[start, end)` by RFC 9162's recursion, reading perfect
    /// subtrees from the levels (the recursion only ever asks for aligned ones).
    fn range(&self, start: usize, end: usize) -> Digest {
        let n = end - start;
        if n.is_power_of_two() && start.is_multiple_of(n) {
            let k = n.trailing_zeros() as usize;
            return self.levels[k][start >> k];
        }
        let k = split(n);
        node(&self.range(start, start + k), &self.range(start + k, end))
    }

    fn path(&self, start: usize, end: usize, m: usize) -> Vec<Digest> {
        let n = end - start;
        if n <= 1 {
            return Vec::new();
        }
        let k = split(n);
        let (mut p, sibling) = if m < k {
            (self.path(start, start + k, m), self.range(start + k, end))
        } else {
            (
                self.path(start + k, end, m - k),
                self.range(start, start + k),
            )
        };
        p.push(sibling);
        p
    }
}

/// The evidence that one entry is in a tree of `size` entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    /// The entry's position (its sequence number).
    pub index: u64,
    pub size: u64,
    /// Sibling hashes from the leaf up.
    pub path: Vec<Digest>,
}

/// The audit path of entry `index` in the tree over `entries`; `None` if out of range.
pub fn inclusion_proof(entries: &[Digest], index: usize) -> Option<InclusionProof> {
    (index < entries.len()).then(|| InclusionProof {
        index: index as u64,
        size: entries.len() as u64,
        path: path(entries, index),
    })
}

fn path(entries: &[Digest], m: usize) -> Vec<Digest> {
    if entries.len() <= 1 {
        return Vec::new();
    }
    let k = split(entries.len());
    let (mut p, sibling) = if m < k {
        (path(&entries[..k], m), root(&entries[k..]))
    } else {
        (path(&entries[k..], m - k), root(&entries[..k]))
    };
    p.push(sibling);
    p
}

/// Whether `proof` shows the entry hashed `entry_hash` in the tree of `size` entries whose
/// root is `root` (both from a signed tree head; RFC 9162, 2.1.3.2).
pub fn verify_inclusion(
    entry_hash: &Digest,
    proof: &InclusionProof,
    size: u64,
    root: &Digest,
) -> bool {
    if proof.size != size || proof.index >= proof.size {
        return false;
    }
    let (mut f, mut s) = (proof.index, proof.size - 1);
    let mut r = leaf(entry_hash);
    for p in &proof.path {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: usize) -> Vec<Digest> {
        (0..n)
            .map(|i| Digest(*blake3::hash(&(i as u64).to_le_bytes()).as_bytes()))
            .collect()
    }

    /// Every proof of every tree up to 70 entries verifies; a proof against another
    /// entry, index, size or root does not.
    #[test]
    fn every_proof_verifies_and_no_wrong_one_does() {
        for n in 1..=70 {
            let leaves = entries(n);
            let r = root(&leaves);
            for i in 0..n {
                let proof = inclusion_proof(&leaves, i).expect("in range");
                assert!(
                    verify_inclusion(&leaves[i], &proof, n as u64, &r),
                    "n {n} i {i}"
                );
                let other = &leaves[(i + 1) % n];
                assert!(n == 1 || !verify_inclusion(other, &proof, n as u64, &r));
                let moved = InclusionProof {
                    index: (proof.index + 1) % n as u64,
                    ..proof.clone()
                };
                assert!(n == 1 || !verify_inclusion(&leaves[i], &moved, n as u64, &r));
                assert!(!verify_inclusion(&leaves[i], &proof, n as u64 + 1, &r));
                let bigger = entries(n + 1);
                assert!(!verify_inclusion(
                    &leaves[i],
                    &proof,
                    n as u64,
                    &root(&bigger)
                ));
                let bigger_proof = inclusion_proof(&bigger, i).expect("in range");
                assert!(verify_inclusion(
                    &leaves[i],
                    &bigger_proof,
                    n as u64 + 1,
                    &root(&bigger)
                ));
            }
            assert!(inclusion_proof(&leaves, n).is_none());
        }
    }

    /// The growing tree gives the recursion's root and paths for every size and entry.
    #[test]
    fn the_growing_tree_agrees_with_the_recursion() {
        let leaves = entries(70);
        let mut tree = Tree::default();
        assert_eq!(tree.root(0), root(&[]));
        for (n, entry) in leaves.iter().enumerate() {
            tree.push(entry);
            assert_eq!(tree.len(), n + 1);
        }
        for size in 1..=70 {
            assert_eq!(tree.root(size), root(&leaves[..size]), "size {size}");
            for i in 0..size {
                assert_eq!(
                    tree.inclusion_proof(i, size),
                    inclusion_proof(&leaves[..size], i),
                    "size {size} entry {i}"
                );
            }
            assert_eq!(tree.inclusion_proof(size, size), None);
        }
        assert_eq!(tree.inclusion_proof(0, 71), None);
    }

    /// The shape is RFC 9162's: a 3-leaf tree is ((0, 1), 2), and a proof for leaf 2 is
    /// one hash long.
    #[test]
    fn shape_follows_the_rfc() {
        let l = entries(3);
        assert_eq!(
            root(&l),
            node(&node(&leaf(&l[0]), &leaf(&l[1])), &leaf(&l[2]))
        );
        let proof = inclusion_proof(&l, 2).expect("in range");
        assert_eq!(proof.path, vec![node(&leaf(&l[0]), &leaf(&l[1]))]);
        assert_eq!(split(2), 1);
        assert_eq!(split(5), 4);
        assert_eq!(split(8), 4);
        assert_eq!(split(9), 8);
    }
}
