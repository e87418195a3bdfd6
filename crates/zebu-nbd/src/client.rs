//! A minimal NBD client (one request at a time) for tests and tools: OPT_GO handshake, simple
//! replies, READ/WRITE/FLUSH/WRITE_ZEROES.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::proto::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("server refused: {0}")]
    Refused(String),
    #[error("request failed with NBD error {0}")]
    Errno(u32),
}

pub struct NbdClient {
    sock: TcpStream,
    size: u64,
    cookie: u64,
}

impl NbdClient {
    pub async fn connect(addr: &str, export: &str) -> Result<NbdClient, ClientError> {
        let mut sock = TcpStream::connect(addr).await?;
        sock.set_nodelay(true)?;
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello).await?;
        if hello[..8] != NBDMAGIC.to_be_bytes() {
            return Err(ClientError::Refused("not an NBD server".into()));
        }
        sock.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
            .await?;
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let mut o = Vec::new();
        o.extend_from_slice(&IHAVEOPT.to_be_bytes());
        o.extend_from_slice(&OPT_GO.to_be_bytes());
        o.extend_from_slice(&(d.len() as u32).to_be_bytes());
        o.extend_from_slice(&d);
        sock.write_all(&o).await?;
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            sock.read_exact(&mut h).await?;
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            if len > MAX_OPTION_LEN as usize {
                return Err(ClientError::Refused("oversized option reply".into()));
            }
            let mut data = vec![0u8; len];
            sock.read_exact(&mut data).await?;
            match kind {
                REP_ACK => break,
                REP_INFO if data.len() >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&data[2..10]);
                    size = u64::from_be_bytes(s);
                }
                REP_INFO => {}
                _ => {
                    return Err(ClientError::Refused(
                        String::from_utf8_lossy(&data).into_owned(),
                    ));
                }
            }
        }
        Ok(NbdClient {
            sock,
            size,
            cookie: 0,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    async fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        self.cookie += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.sock.write_all(&b).await?;
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h).await?;
        let err = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        if err != 0 {
            return Err(ClientError::Errno(err));
        }
        Ok(())
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data)
            .await
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.request(CMD_READ, 0, offset, len, &[]).await?;
        let mut buf = vec![0u8; len as usize];
        self.sock.read_exact(&mut buf).await?;
        Ok(buf)
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, &[]).await
    }

    pub async fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, &[]).await
    }

    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        self.cookie += 1;
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&CMD_DISC.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&[0u8; 12]);
        self.sock.write_all(&b).await?;
        Ok(())
    }
}
