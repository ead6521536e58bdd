//! The client side of the fixed-newstyle handshake.
//!
//! Greeting, then `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT`
//! (when contexts are wanted) and `NBD_OPT_GO` with `NBD_INFO_BLOCK_SIZE`
//! (falling back to `NBD_OPT_EXPORT_NAME` for servers without `NBD_OPT_GO`).
//! Every length the server sends is bounded before anything is read or
//! allocated for it. An error reply ends the session with `NBD_OPT_ABORT`
//! (a soft disconnect); a protocol violation just drops the connection.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use super::error::{message, ClientError, ProtocolError};
use super::info::{BlockSizes, ExportInfo, MetaContext};
use crate::proto::*;

/// Bound on the data of one option reply: the largest legal ones (a context
/// name or an export name of 4096 bytes plus a few fields) fit easily.
pub(crate) const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Bound on the number of contexts one `NBD_OPT_SET_META_CONTEXT` may grant.
pub(crate) const MAX_CONTEXTS: usize = 256;

/// What the handshake agreed on.
#[derive(Debug)]
pub(crate) struct Negotiated {
    pub info: ExportInfo,
    pub contexts: Vec<MetaContext>,
}

/// Runs the whole handshake for `export` on a fresh connection.
pub(crate) async fn handshake<S>(
    io: &mut S,
    export: &str,
    structured: bool,
    contexts: &[String],
) -> Result<Negotiated, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    check_name(export, "export name")?;
    for c in contexts {
        check_context_name(c)?;
    }
    let no_zeroes = greet(io).await?;
    let mut h = Haggle { io, export };
    match h.options(structured, contexts, no_zeroes).await {
        Err(e) if soft_disconnect(&e) => {
            // "In the client's case, if it wishes to [terminate the session]
            // it MUST use soft disconnect"; "If the client receives
            // `NBD_REP_ERR_SHUTDOWN` it MUST initiate a soft disconnect."
            h.abort().await;
            Err(e)
        }
        r => r,
    }
}

/// Errors after which the session is still in step, so `NBD_OPT_ABORT` is due.
fn soft_disconnect(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::ExportNotFound { .. }
            | ClientError::TlsRequired { .. }
            | ClientError::ServerShutdown { .. }
            | ClientError::OptionRefused { .. }
    )
}

/// Reads the greeting and answers with the client flags; returns whether the
/// 124 zero bytes after `NBD_OPT_EXPORT_NAME` are off.
async fn greet<S>(io: &mut S) -> Result<bool, ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let eof = |e| ClientError::io(e, "the greeting");
    let magic = io.read_u64().await.map_err(eof)?;
    if magic != NBDMAGIC {
        return Err(ClientError::NotNbd { got: magic });
    }
    let style = io.read_u64().await.map_err(eof)?;
    if style == CLISERV_MAGIC {
        return Err(ClientError::Oldstyle);
    }
    if style != IHAVEOPT {
        return Err(ProtocolError::BadMagic {
            what: "newstyle greeting",
            got: style,
        }
        .into());
    }
    let flags = io.read_u16().await.map_err(eof)?;
    // "`NBD_FLAG_FIXED_NEWSTYLE`; MUST be set by servers that support the
    // fixed newstyle protocol": we need it for every option but EXPORT_NAME.
    if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotFixedNewstyle { flags });
    }
    // `NBD_FLAG_C_NO_ZEROES` "MUST NOT be set if the server did not set
    // `NBD_FLAG_NO_ZEROES`"; "The client SHOULD ignore any handshake flags it
    // does not recognize".
    let no_zeroes = flags & NBD_FLAG_NO_ZEROES != 0;
    let mut client = NBD_FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client |= NBD_FLAG_C_NO_ZEROES;
    }
    io.write_all(&client.to_be_bytes())
        .await
        .map_err(ClientError::Io)?;
    debug!(flags, "NBD greeting: fixed newstyle");
    Ok(no_zeroes)
}

/// Option haggling on one connection.
struct Haggle<'a, S> {
    io: &'a mut S,
    export: &'a str,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Haggle<'_, S> {
    async fn options(
        &mut self,
        structured: bool,
        contexts: &[String],
        no_zeroes: bool,
    ) -> Result<Negotiated, ClientError> {
        let structured = structured && self.structured_reply().await?;
        let granted = match (structured, contexts.is_empty()) {
            (_, true) => Vec::new(),
            (true, false) => self.set_meta_context(contexts).await?,
            (false, false) => {
                // "This option MUST NOT be requested unless structured
                // replies have been negotiated first."
                warn!("no structured replies, so no metadata contexts can be selected");
                Vec::new()
            }
        };
        let info = match self.go(structured).await? {
            Some(info) => info,
            None => self.export_name(structured, no_zeroes).await?,
        };
        // "bit 0, `NBD_FLAG_HAS_FLAGS`: MUST always be 1."
        if info.flags & NBD_FLAG_HAS_FLAGS == 0 {
            return Err(ProtocolError::Invalid(format!(
                "transmission flags {:#06x} lack NBD_FLAG_HAS_FLAGS",
                info.flags
            ))
            .into());
        }
        debug!(export = self.export, size = info.size, flags = info.flags, structured,
            contexts = ?granted, block_size = ?info.block_size, "NBD handshake done");
        Ok(Negotiated {
            info,
            contexts: granted,
        })
    }

    /// Sends one option with its data.
    async fn send(&mut self, option: u32, data: &[u8]) -> Result<(), ClientError> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        // Our option data is a few names of at most 4096 bytes each.
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.io.write_all(&b).await.map_err(ClientError::Io)?;
        self.io.flush().await.map_err(ClientError::Io)
    }

    /// Reads one option reply: (reply type, data).
    async fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
        let eof = |e| ClientError::io(e, "option haggling");
        let mut h = [0u8; 20];
        self.io.read_exact(&mut h).await.map_err(eof)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtocolError::BadMagic {
                what: "option reply",
                got: magic,
            }
            .into());
        }
        let got = be32(&h[8..12]);
        let kind = be32(&h[12..16]);
        let len = be32(&h[16..20]);
        if got != option {
            return Err(ProtocolError::Invalid(format!(
                "a reply to {} ({got}) while {} was pending",
                option_name(got),
                option_name(option)
            ))
            .into());
        }
        if len > MAX_OPTION_REPLY {
            return Err(ProtocolError::TooLong {
                what: "option reply",
                len: len.into(),
                max: MAX_OPTION_REPLY.into(),
            }
            .into());
        }
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data).await.map_err(eof)?;
        Ok((kind, data))
    }

    /// The error for an error reply (or a reply type that makes no sense here).
    fn refused(&self, option: u32, kind: u32, data: &[u8]) -> ClientError {
        let message = message(data);
        match kind {
            NBD_REP_ERR_UNKNOWN => ClientError::ExportNotFound {
                export: self.export.to_owned(),
                message,
            },
            NBD_REP_ERR_TLS_REQD => ClientError::TlsRequired { message },
            NBD_REP_ERR_SHUTDOWN => ClientError::ServerShutdown { message },
            k if k & (1 << 31) != 0 => ClientError::OptionRefused {
                option: option_name(option),
                reply: reply_name(k),
                message,
            },
            k => ProtocolError::Invalid(format!(
                "reply type {} ({k}) to {}",
                reply_name(k),
                option_name(option)
            ))
            .into(),
        }
    }

    /// `NBD_OPT_STRUCTURED_REPLY`; false when the server does not offer it.
    async fn structured_reply(&mut self) -> Result<bool, ClientError> {
        let opt = NBD_OPT_STRUCTURED_REPLY;
        self.send(opt, &[]).await?;
        match self.reply(opt).await? {
            (NBD_REP_ACK, _) => Ok(true),
            // "clients SHOULD be prepared to also handle `NBD_REP_ERR_UNSUP`;
            // in this case, no structured replies will be sent."
            (NBD_REP_ERR_UNSUP | NBD_REP_ERR_POLICY, _) => {
                debug!("the server does not offer structured replies");
                Ok(false)
            }
            (kind, data) => Err(self.refused(opt, kind, &data)),
        }
    }

    /// `NBD_OPT_SET_META_CONTEXT`; returns the contexts granted.
    async fn set_meta_context(
        &mut self,
        contexts: &[String],
    ) -> Result<Vec<MetaContext>, ClientError> {
        let opt = NBD_OPT_SET_META_CONTEXT;
        let mut d = Vec::new();
        put_string(&mut d, self.export);
        d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
        for c in contexts {
            put_string(&mut d, c);
        }
        self.send(opt, &d).await?;
        let mut granted: Vec<MetaContext> = Vec::new();
        loop {
            match self.reply(opt).await? {
                (NBD_REP_META_CONTEXT, data) => {
                    let ctx = parse_meta_context(&data)?;
                    // "each with a unique metadata context ID".
                    if granted.iter().any(|g| g.id == ctx.id) {
                        return Err(ProtocolError::Invalid(format!(
                            "metadata context id {} granted twice",
                            ctx.id
                        ))
                        .into());
                    }
                    if granted.len() == MAX_CONTEXTS {
                        return Err(ProtocolError::TooLong {
                            what: "list of granted metadata contexts",
                            len: MAX_CONTEXTS as u64 + 1,
                            max: MAX_CONTEXTS as u64,
                        }
                        .into());
                    }
                    granted.push(ctx);
                }
                (NBD_REP_ACK, _) => break,
                (NBD_REP_ERR_UNSUP | NBD_REP_ERR_POLICY, _) => {
                    // A server without metadata contexts grants none; "If an
                    // error is returned, the client MUST disregard any context
                    // replies that may have been sent."
                    debug!("the server does not offer metadata contexts");
                    return Ok(Vec::new());
                }
                (kind, data) => return Err(self.refused(opt, kind, &data)),
            }
        }
        for want in contexts {
            if !granted.iter().any(|g| &g.name == want) {
                debug!(context = want.as_str(), "metadata context not granted");
            }
        }
        Ok(granted)
    }

    /// `NBD_OPT_GO` asking for `NBD_INFO_BLOCK_SIZE`; `None` when the server
    /// does not know the option.
    async fn go(&mut self, structured: bool) -> Result<Option<ExportInfo>, ClientError> {
        let opt = NBD_OPT_GO;
        let mut d = Vec::new();
        put_string(&mut d, self.export);
        // "If a client can honour server size constraints ... it SHOULD
        // announce this ... with an `NBD_INFO_BLOCK_SIZE` information request"
        // (and then "MUST abide by the size constraints it receives": reads
        // are split and checked against them).
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        self.send(opt, &d).await?;
        let mut export: Option<(u64, u16)> = None;
        let mut sizes: Option<BlockSizes> = None;
        loop {
            match self.reply(opt).await? {
                (NBD_REP_INFO, data) => parse_info(&data, &mut export, &mut sizes)?,
                (NBD_REP_ACK, _) => break,
                // "clients SHOULD be prepared to also handle
                // `NBD_REP_ERR_UNSUP` by falling back to using `NBD_OPT_EXPORT_NAME`".
                (NBD_REP_ERR_UNSUP, _) => return Ok(None),
                (kind, data) => return Err(self.refused(opt, kind, &data)),
            }
        }
        // "the server MUST send at least one `NBD_REP_INFO`, with an
        // `NBD_INFO_EXPORT` information type."
        let (size, flags) = export.ok_or_else(|| {
            ProtocolError::Invalid("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into())
        })?;
        Ok(Some(ExportInfo {
            export: self.export.to_owned(),
            size,
            flags,
            block_size: sizes.unwrap_or_default(),
            block_size_advertised: sizes.is_some(),
            structured_replies: structured,
        }))
    }

    /// `NBD_OPT_EXPORT_NAME`, for servers without `NBD_OPT_GO`.
    async fn export_name(
        &mut self,
        structured: bool,
        no_zeroes: bool,
    ) -> Result<ExportInfo, ClientError> {
        debug!("the server lacks NBD_OPT_GO; falling back to NBD_OPT_EXPORT_NAME");
        self.send(NBD_OPT_EXPORT_NAME, self.export.as_bytes())
            .await?;
        // "If the server is unwilling to allow the export, it MUST terminate the session."
        let gone = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ClientError::ExportNotFound {
                export: self.export.to_owned(),
                message: "the server closed the connection after NBD_OPT_EXPORT_NAME".into(),
            },
            _ => ClientError::Io(e),
        };
        let mut b = [0u8; 10 + 124];
        let n = if no_zeroes { 10 } else { b.len() };
        self.io.read_exact(&mut b[..n]).await.map_err(gone)?;
        Ok(ExportInfo {
            export: self.export.to_owned(),
            size: u64::from_be_bytes(b[0..8].try_into().unwrap_or_default()),
            flags: u16::from_be_bytes([b[8], b[9]]),
            block_size: BlockSizes::default(),
            block_size_advertised: false,
            structured_replies: structured,
        })
    }

    /// Soft disconnect: `NBD_OPT_ABORT`, then wait briefly for its `NBD_REP_ACK`.
    async fn abort(&mut self) {
        let done = async {
            self.send(NBD_OPT_ABORT, &[]).await?;
            // "the client SHOULD gracefully handle the server closing the
            // connection after receiving an `NBD_OPT_ABORT` without it sending a reply".
            let _ = self.reply(NBD_OPT_ABORT).await;
            Ok::<(), ClientError>(())
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), done).await;
    }
}

/// One `NBD_REP_INFO` item.
fn parse_info(
    d: &[u8],
    export: &mut Option<(u64, u16)>,
    sizes: &mut Option<BlockSizes>,
) -> Result<(), ClientError> {
    let bad = |what: &str| ProtocolError::Invalid(format!("malformed {what} ({} bytes)", d.len()));
    if d.len() < 2 {
        return Err(bad("NBD_REP_INFO").into());
    }
    match u16::from_be_bytes([d[0], d[1]]) {
        // "*length* MUST be 12".
        NBD_INFO_EXPORT if d.len() == 12 => {
            let size = u64::from_be_bytes(d[2..10].try_into().unwrap_or_default());
            *export = Some((size, u16::from_be_bytes([d[10], d[11]])));
        }
        NBD_INFO_EXPORT => return Err(bad("NBD_INFO_EXPORT").into()),
        // "The *length* MUST be 14".
        NBD_INFO_BLOCK_SIZE if d.len() == 14 => {
            let s = BlockSizes::checked(be32(&d[2..6]), be32(&d[6..10]), be32(&d[10..14]))
                .map_err(ProtocolError::Invalid)?;
            *sizes = Some(s);
        }
        NBD_INFO_BLOCK_SIZE => return Err(bad("NBD_INFO_BLOCK_SIZE").into()),
        // "The client MUST ignore information replies it does not understand."
        other => debug!(info = other, "ignoring an information reply"),
    }
    Ok(())
}

/// `NBD_REP_META_CONTEXT` data: id, then the name ("MUST be valid UTF-8 data").
fn parse_meta_context(d: &[u8]) -> Result<MetaContext, ClientError> {
    if d.len() < 4 || d.len() > 4 + MAX_STRING {
        return Err(
            ProtocolError::Invalid(format!("NBD_REP_META_CONTEXT of {} bytes", d.len())).into(),
        );
    }
    let name = std::str::from_utf8(&d[4..])
        .map_err(|_| ProtocolError::Invalid("metadata context name is not UTF-8".into()))?;
    Ok(MetaContext {
        name: name.to_owned(),
        id: be32(&d[0..4]),
    })
}

/// Checks a string we are about to send: "MUST NOT contain `NUL` characters
/// ... MUST be no longer than 4096 bytes".
fn check_name(s: &str, what: &'static str) -> Result<(), ClientError> {
    if s.contains('\0') || s.len() > MAX_STRING {
        return Err(ClientError::InvalidName {
            what,
            name: s.to_owned(),
        });
    }
    Ok(())
}

/// "The name MUST consist of a namespace, followed by a colon, followed by a
/// leaf-name. The namespace must consist entirely of printable non-whitespace
/// UTF-8 characters other than colons, and be non-empty."
fn check_context_name(s: &str) -> Result<(), ClientError> {
    check_name(s, "metadata context name")?;
    let ok = s.split_once(':').is_some_and(|(ns, _)| {
        !ns.is_empty() && ns.chars().all(|c| !c.is_whitespace() && !c.is_control())
    });
    if !ok {
        return Err(ClientError::InvalidName {
            what: "metadata context name",
            name: s.to_owned(),
        });
    }
    Ok(())
}

/// Appends a 32-bit length and the string.
fn put_string(out: &mut Vec<u8>, s: &str) {
    // Callers checked s.len() <= MAX_STRING.
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Big-endian u32 from exactly 4 bytes.
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_items_are_checked() {
        let (mut e, mut s) = (None, None);
        let mut item = NBD_INFO_EXPORT.to_be_bytes().to_vec();
        item.extend_from_slice(&4096u64.to_be_bytes());
        item.extend_from_slice(&3u16.to_be_bytes());
        parse_info(&item, &mut e, &mut s).unwrap();
        assert_eq!(e, Some((4096, 3)));
        item.push(0);
        assert!(parse_info(&item, &mut e, &mut s).is_err());
        assert!(parse_info(&[0], &mut e, &mut s).is_err());
        // Unknown items are ignored, whatever their length.
        parse_info(&[0x12, 0x34, 1, 2, 3], &mut e, &mut s).unwrap();
        let mut bs = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 1 << 20] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        parse_info(&bs, &mut e, &mut s).unwrap();
        assert_eq!(s.map(|s| s.minimum), Some(512));
        bs[5] = 3; // minimum 515: not a power of two
        assert!(parse_info(&bs, &mut e, &mut s).is_err());
    }

    #[test]
    fn context_names_need_a_namespace() {
        assert!(check_context_name("base:allocation").is_ok());
        assert!(check_context_name("qemu:dirty-bitmap:b0").is_ok());
        for bad in ["allocation", ":x", "a b:c", "nul\0:x"] {
            assert!(check_context_name(bad).is_err(), "{bad:?}");
        }
        assert!(parse_meta_context(&[0, 0, 0, 1, 0xff]).is_err());
        assert_eq!(
            parse_meta_context(b"\0\0\0\x05base:allocation").unwrap(),
            MetaContext {
                name: "base:allocation".into(),
                id: 5
            }
        );
    }
}
