//! VIP addresses on the client-facing interface, through rtnetlink.
//!
//! Each VIP is added as a /32 so the host answers ARP and ping for it and a userspace proxy
//! can bind to it. Only addresses the daemon added itself are ever removed by it.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use rtnetlink::Handle;

/// Why an address operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The interface does not exist.
    #[error("interface {0} does not exist")]
    NoInterface(String),
    /// Opening the netlink socket failed.
    #[error("opening rtnetlink: {0}")]
    Socket(#[from] std::io::Error),
    /// The kernel refused a request.
    #[error("rtnetlink {action} {addr}/32 on {interface}: {source}")]
    Netlink {
        /// What was attempted.
        action: &'static str,
        /// The address.
        addr: Ipv4Addr,
        /// The interface.
        interface: String,
        /// The kernel's answer.
        source: rtnetlink::Error,
    },
}

/// Adds and removes /32 addresses on one interface.
pub struct VipAddresses {
    handle: Handle,
    ifindex: u32,
    interface: String,
}

/// Returns an interface's index.
pub fn ifindex(interface: &str) -> Result<u32, NetError> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| NetError::NoInterface(interface.to_string()))?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(NetError::NoInterface(interface.to_string())),
        index => Ok(index),
    }
}

impl VipAddresses {
    /// Opens rtnetlink for `interface` (must be called inside a tokio runtime).
    pub fn new(interface: &str) -> Result<Self, NetError> {
        let ifindex = ifindex(interface)?;
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            ifindex,
            interface: interface.to_string(),
        })
    }

    fn error(
        &self,
        action: &'static str,
        addr: Ipv4Addr,
    ) -> impl FnOnce(rtnetlink::Error) -> NetError {
        let interface = self.interface.clone();
        move |source| NetError::Netlink {
            action,
            addr,
            interface,
            source,
        }
    }

    async fn find(
        &self,
        addr: Ipv4Addr,
    ) -> Result<Option<netlink_packet_route::address::AddressMessage>, NetError> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(self.ifindex)
            .set_address_filter(IpAddr::V4(addr))
            .execute()
            .try_next()
            .await
            .map_err(self.error("get", addr))
    }

    /// Adds `addr/32` unless present; returns whether this call added it.
    pub async fn add(&self, addr: Ipv4Addr) -> Result<bool, NetError> {
        if self.find(addr).await?.is_some() {
            return Ok(false);
        }
        self.handle
            .address()
            .add(self.ifindex, IpAddr::V4(addr), 32)
            .execute()
            .await
            .map_err(self.error("add", addr))?;
        Ok(true)
    }

    /// Removes `addr` from the interface if present.
    pub async fn remove(&self, addr: Ipv4Addr) -> Result<(), NetError> {
        if let Some(message) = self.find(addr).await? {
            self.handle
                .address()
                .del(message)
                .execute()
                .await
                .map_err(self.error("delete", addr))?;
        }
        Ok(())
    }
}
