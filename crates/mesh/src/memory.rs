//! Peers in one process: bounded channels, one inbox per peer. The sender is who the
//! hub made the transport for, so it is authenticated by construction.

use std::collections::BTreeMap;
use std::sync::Arc;

use protocol::WorkerId;
use tokio::sync::mpsc;

use crate::{QUEUE_MAX, Transport};

/// One peer's end of an in-process network.
pub struct MemTransport {
    id: WorkerId,
    inbox: mpsc::Receiver<(WorkerId, Vec<u8>)>,
    others: BTreeMap<WorkerId, mpsc::Sender<(WorkerId, Vec<u8>)>>,
}

/// A network of `members`, one transport each, in their order.
pub fn network(members: &[WorkerId]) -> Vec<MemTransport> {
    let (senders, inboxes): (Vec<_>, Vec<_>) =
        members.iter().map(|_| mpsc::channel(QUEUE_MAX)).unzip();
    members
        .iter()
        .zip(inboxes)
        .map(|(id, inbox)| MemTransport {
            id: *id,
            inbox,
            others: members
                .iter()
                .zip(&senders)
                .filter(|(m, _)| *m != id)
                .map(|(m, s)| (*m, s.clone()))
                .collect(),
        })
        .collect()
}

impl Transport for MemTransport {
    fn id(&self) -> WorkerId {
        self.id
    }

    fn send(&self, to: WorkerId, bytes: Arc<Vec<u8>>) {
        if bytes.len() > peer::wire::MESSAGE_BYTES_MAX {
            return;
        }
        if let Some(tx) = self.others.get(&to) {
            let _ = tx.try_send((self.id, bytes.to_vec()));
        }
    }

    async fn recv(&mut self) -> Option<(WorkerId, Vec<u8>)> {
        self.inbox.recv().await
    }

    // Every message is in its receiver's inbox the moment it is sent.
    async fn shutdown(self) {}
}
