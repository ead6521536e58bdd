//! Fixed-newstyle handshake and option haggling.
//!
//! [`greet`] sends the server's greeting and reads the client flags; [`haggle`]
//! then serves options up to the moment the client enters transmission
//! (`NBD_OPT_EXPORT_NAME` or a successful `NBD_OPT_GO`), the session ends
//! (`NBD_OPT_ABORT`, EOF, a protocol violation), or, with TLS required, the
//! client's `NBD_OPT_STARTTLS` is acknowledged: the caller then runs the TLS
//! handshake and haggles on over TLS (see [`crate::tls`]). Every length read
//! from the wire is bounded before anything is allocated for it.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::error::ServeError;
use crate::exports::{Export, Exports};
use crate::proto::*;
use crate::source::BlockSource;

/// What option haggling agreed on.
#[derive(Debug)]
pub(crate) struct Negotiated {
    /// The export chosen for transmission.
    pub export: Arc<Export>,
    /// The name the client used (for logs).
    pub name: String,
    /// Whether `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// Whether `base:allocation` was selected for this export.
    pub base_allocation: bool,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

/// Transmission flags for `source`, given whether structured replies are on.
pub(crate) fn transmission_flags(source: &dyn BlockSource, structured: bool) -> u16 {
    let mut f = NBD_FLAG_HAS_FLAGS;
    if source.read_only() {
        f |= NBD_FLAG_READ_ONLY;
    } else {
        if source.can_fua() {
            f |= NBD_FLAG_SEND_FUA;
        }
        if source.can_trim() {
            f |= NBD_FLAG_SEND_TRIM;
        }
        if source.can_write_zeroes() {
            // "MUST set this transmission flag to 0 if
            // `NBD_FLAG_SEND_WRITE_ZEROES` is not set"; sources that cannot zero
            // fast answer FAST_ZERO with Unsupported, which the spec allows.
            f |= NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
        }
    }
    if source.can_flush() {
        f |= NBD_FLAG_SEND_FLUSH;
    }
    if structured {
        // We always answer a read with a single content chunk, so DF is free;
        // "MUST leave this flag clear if structured replies have not been negotiated".
        f |= NBD_FLAG_SEND_DF;
    }
    if source.can_multi_conn() {
        f |= NBD_FLAG_CAN_MULTI_CONN;
    }
    if source.can_cache() {
        f |= NBD_FLAG_SEND_CACHE;
    }
    f
}

/// The preferred block size rounded to what the spec allows: "MUST be a power
/// of 2 at least as large as the maximum of the minimum block size and 2^9"
/// and the maximum payload "MUST be at least as large as the preferred block size".
fn preferred_block_size(source: &dyn BlockSource) -> u32 {
    let p = source.preferred_block_size().clamp(512, MAX_PAYLOAD);
    if p.is_power_of_two() {
        p
    } else {
        // Round down to a power of two (p >= 512 so the result is >= 512).
        1 << (31 - p.leading_zeros())
    }
}

/// Appends one option reply: magic, option, reply type, length, data.
fn put_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    // Replies we build are bounded by MAX_STRING-sized names; never near u32.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an error reply with a message for humans.
fn put_error(out: &mut Vec<u8>, option: u32, kind: u32, msg: &str) {
    put_reply(out, option, kind, msg.as_bytes());
}

/// A little cursor over option data; every getter fails instead of panicking.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self, n: u32) -> Option<String> {
        let n = usize::try_from(n).ok()?;
        if n > MAX_STRING {
            return None;
        }
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).ok()?;
        if s.contains('\0') {
            return None;
        }
        Some(s.to_owned())
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` data: name, then the information requests.
pub(crate) fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let mut c = Cursor(data);
    let len = c.u32()?;
    let name = c.string(len)?;
    let n = c.u16()?;
    let mut items = Vec::with_capacity(usize::from(n).min(16));
    for _ in 0..n {
        items.push(c.u16()?);
    }
    c.is_empty().then_some((name, items))
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: export name, then queries.
pub(crate) fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut c = Cursor(data);
    let len = c.u32()?;
    let name = c.string(len)?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        let len = c.u32()?;
        queries.push(c.string(len)?);
    }
    c.is_empty().then_some((name, queries))
}

/// Where a connection stands with TLS, in the spec's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsMode {
    /// NOTLS: the server has no certificate; `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_UNSUP`.
    Off,
    /// FORCEDTLS before the upgrade: only `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` are served.
    Required,
    /// FORCEDTLS after a successful `NBD_OPT_STARTTLS`.
    Active,
}

/// What option haggling has agreed so far on one connection.
#[derive(Debug)]
pub(crate) struct Session {
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    no_zeroes: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    structured: bool,
    /// The export for which `base:allocation` is selected, if any.
    meta: Option<Arc<Export>>,
    /// TLS state.
    pub tls: TlsMode,
}

/// How a round of option haggling ended.
#[derive(Debug)]
pub(crate) enum Step {
    /// The client entered transmission.
    Transmit(Negotiated),
    /// The session ended cleanly before transmission (abort, EOF, refused export).
    End,
    /// `NBD_REP_ACK` to `NBD_OPT_STARTTLS` went out: the caller runs the TLS
    /// handshake on the same socket and calls [`haggle`] again over TLS.
    StartTls,
}

/// Sends the greeting and reads the client flags. `tls_configured` selects
/// FORCEDTLS; "The server MUST operate in NOTLS mode unless ... the client
/// replied with `NBD_FLAG_C_FIXED_NEWSTYLE`", and a server that insists on TLS
/// cannot serve such a client, so it is refused.
pub(crate) async fn greet<S>(io: &mut S, tls_configured: bool) -> Result<Session, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&greeting).await?;
    io.flush().await?;

    let client_flags = io.read_u32().await?;
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        // "the server MUST drop the TCP connection if the client sets an unknown flag".
        return Err(ServeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let fixed = client_flags & NBD_FLAG_C_FIXED_NEWSTYLE != 0;
    if tls_configured && !fixed {
        return Err(ServeError::Protocol(
            "client does not speak fixed newstyle, so it cannot start the TLS this server requires"
                .into(),
        ));
    }
    // "Servers MAY choose to honour fixed newstyle from clients that didn't set
    // this bit": we do; a non-fixed client only sends NBD_OPT_EXPORT_NAME anyway.
    Ok(Session {
        no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
        tls: if tls_configured {
            TlsMode::Required
        } else {
            TlsMode::Off
        },
    })
}

/// Haggles options until the client enters transmission, the session ends,
/// or (FORCEDTLS) the client's `NBD_OPT_STARTTLS` was acknowledged.
pub(crate) async fn haggle<S>(
    io: &mut S,
    exports: &Exports,
    session: &mut Session,
) -> Result<Step, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    loop {
        let mut head = [0u8; 16];
        io.read_exact(&mut head).await?;
        let magic = u64::from_be_bytes(head[0..8].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(ServeError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap_or_default());
        if len > MAX_OPTION_DATA {
            // Reading 4 GiB to skip it is not worth it: a client that sends
            // such an option is broken or hostile.
            return Err(ServeError::Protocol(format!(
                "option {option} with {len} bytes of data exceeds {MAX_OPTION_DATA}"
            )));
        }
        let mut data = vec![0u8; len as usize];
        io.read_exact(&mut data).await?;
        debug!(option, len, tls = ?session.tls, "option");
        out.clear();

        if session.tls == TlsMode::Required {
            match option {
                NBD_OPT_STARTTLS if data.is_empty() => {
                    // "If the server receives `NBD_OPT_STARTTLS` prior to
                    // negotiating TLS, it MUST reply with `NBD_REP_ACK`."
                    put_reply(&mut out, option, NBD_REP_ACK, &[]);
                    write_out(io, &out).await?;
                    return Ok(Step::StartTls);
                }
                NBD_OPT_STARTTLS => {
                    put_error(
                        &mut out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_STARTTLS takes no data",
                    );
                }
                NBD_OPT_ABORT => {
                    put_reply(&mut out, option, NBD_REP_ACK, &[]);
                    let _ = write_out(io, &out).await;
                    return Ok(Step::End);
                }
                NBD_OPT_EXPORT_NAME => {
                    // "If the server receives a request to enter transmission
                    // mode via `NBD_OPT_EXPORT_NAME` when TLS has not been
                    // initiated, then as this request cannot error, it MUST
                    // terminate the session."
                    warn!("NBD_OPT_EXPORT_NAME without TLS on a server that requires TLS; closing");
                    return Ok(Step::End);
                }
                _ => {
                    // "If the server receives any other option, it MUST reply
                    // with `NBD_REP_ERR_TLS_REQD` if TLS has not been initiated."
                    put_error(
                        &mut out,
                        option,
                        NBD_REP_ERR_TLS_REQD,
                        "this server requires TLS: send NBD_OPT_STARTTLS first",
                    );
                }
            }
            write_out(io, &out).await?;
            continue;
        }

        let no_zeroes = session.no_zeroes;
        let structured = session.structured;
        let meta = &mut session.meta;
        match option {
            NBD_OPT_EXPORT_NAME => {
                let name = match std::str::from_utf8(&data) {
                    Ok(n) => n.to_owned(),
                    Err(_) => return Err(ServeError::Protocol("export name is not UTF-8".into())),
                };
                // "If the chosen export does not exist ... the server MUST
                // terminate the session."
                let Some(export) = exports.get(&name).cloned() else {
                    warn!(name, "NBD_OPT_EXPORT_NAME for unknown export; closing");
                    return Ok(Step::End);
                };
                let flags = transmission_flags(export.source().as_ref(), structured);
                out.extend_from_slice(&export.source().size().to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                write_out(io, &out).await?;
                let base_allocation = meta.as_ref().is_some_and(|m| Arc::ptr_eq(m, &export));
                return Ok(Step::Transmit(Negotiated {
                    export,
                    name,
                    structured,
                    base_allocation,
                    flags,
                }));
            }
            NBD_OPT_ABORT => {
                // "The server MUST reply with `NBD_REP_ACK`." The client may
                // already be gone; that is fine.
                put_reply(&mut out, option, NBD_REP_ACK, &[]);
                let _ = write_out(io, &out).await;
                return Ok(Step::End);
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    put_error(
                        &mut out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    );
                } else {
                    for (name, export) in exports.iter() {
                        let mut item =
                            Vec::with_capacity(4 + name.len() + export.description().len());
                        item.extend_from_slice(&(name.len() as u32).to_be_bytes());
                        item.extend_from_slice(name.as_bytes());
                        item.extend_from_slice(export.description().as_bytes());
                        put_reply(&mut out, option, NBD_REP_SERVER, &item);
                    }
                    put_reply(&mut out, option, NBD_REP_ACK, &[]);
                }
            }
            NBD_OPT_STARTTLS if session.tls == TlsMode::Active => {
                // "If the server receives `NBD_OPT_STARTTLS` when TLS has
                // already been negotiated, it MUST reply with `NBD_REP_ERR_INVALID`."
                put_error(
                    &mut out,
                    option,
                    NBD_REP_ERR_INVALID,
                    "TLS is already active",
                );
            }
            NBD_OPT_STARTTLS => {
                // NOTLS mode: "it MUST respond with ... `NBD_REP_ERR_UNSUP` (if
                // it does not support the `NBD_OPT_STARTTLS` option at all)".
                put_error(
                    &mut out,
                    option,
                    NBD_REP_ERR_UNSUP,
                    "TLS is not configured on this server",
                );
            }
            NBD_OPT_INFO | NBD_OPT_GO => {
                let Some((name, items)) = parse_info_request(&data) else {
                    put_error(
                        &mut out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "malformed NBD_OPT_INFO/GO",
                    );
                    write_out(io, &out).await?;
                    continue;
                };
                let Some(export) = exports.get(&name).cloned() else {
                    put_error(&mut out, option, NBD_REP_ERR_UNKNOWN, "no such export");
                    write_out(io, &out).await?;
                    continue;
                };
                let source = export.source().as_ref();
                let flags = transmission_flags(source, structured);
                let mut info = [0u8; 14];
                info[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
                info[2..10].copy_from_slice(&source.size().to_be_bytes());
                info[10..12].copy_from_slice(&flags.to_be_bytes());
                put_reply(&mut out, option, NBD_REP_INFO, &info[..12]);
                // Sent even when not asked: "The server MAY send information
                // requests back which are not explicitly requested".
                info[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
                info[2..6].copy_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
                info[6..10].copy_from_slice(&preferred_block_size(source).to_be_bytes());
                info[10..14].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
                put_reply(&mut out, option, NBD_REP_INFO, &info);
                for item in items {
                    let text = match item {
                        NBD_INFO_NAME => export.name(),
                        NBD_INFO_DESCRIPTION => export.description(),
                        // "The server MUST ignore any information requests it does not understand."
                        _ => continue,
                    };
                    let mut d = Vec::with_capacity(2 + text.len());
                    d.extend_from_slice(&item.to_be_bytes());
                    d.extend_from_slice(text.as_bytes());
                    put_reply(&mut out, option, NBD_REP_INFO, &d);
                }
                put_reply(&mut out, option, NBD_REP_ACK, &[]);
                write_out(io, &out).await?;
                if option == NBD_OPT_GO {
                    let base_allocation = meta.as_ref().is_some_and(|m| Arc::ptr_eq(m, &export));
                    return Ok(Step::Transmit(Negotiated {
                        export,
                        name,
                        structured,
                        base_allocation,
                        flags,
                    }));
                }
                continue;
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    // "the server SHOULD reject a request that includes data
                    // with `NBD_REP_ERR_INVALID`".
                    put_error(
                        &mut out,
                        option,
                        NBD_REP_ERR_INVALID,
                        "option takes no data",
                    );
                } else {
                    session.structured = true;
                    put_reply(&mut out, option, NBD_REP_ACK, &[]);
                }
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                let set = option == NBD_OPT_SET_META_CONTEXT;
                if set {
                    // "Issuing this command replaces all previously-set metadata
                    // contexts (including when this command fails)".
                    *meta = None;
                }
                meta_context(&mut out, option, &data, structured, exports, meta);
            }
            _ => {
                put_error(&mut out, option, NBD_REP_ERR_UNSUP, "unsupported option");
            }
        }
        write_out(io, &out).await?;
    }
}

/// Answers `NBD_OPT_LIST_META_CONTEXT` or `NBD_OPT_SET_META_CONTEXT`.
fn meta_context(
    out: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    structured: bool,
    exports: &Exports,
    meta: &mut Option<Arc<Export>>,
) {
    let set = option == NBD_OPT_SET_META_CONTEXT;
    if !structured {
        // "This option MUST NOT be requested unless structured replies have
        // been negotiated first. If a client attempts to do so, a server
        // SHOULD send `NBD_REP_ERR_INVALID`."
        put_error(
            out,
            option,
            NBD_REP_ERR_INVALID,
            "negotiate structured replies first",
        );
        return;
    }
    let Some((name, queries)) = parse_meta_request(data) else {
        // "If the option request is syntactically invalid ... the server MUST
        // fail the request with `NBD_REP_ERR_INVALID`."
        put_error(
            out,
            option,
            NBD_REP_ERR_INVALID,
            "malformed meta context request",
        );
        return;
    };
    let Some(export) = exports.get(&name) else {
        put_error(out, option, NBD_REP_ERR_UNKNOWN, "no such export");
        return;
    };
    let mut found = queries.is_empty() && !set; // "If zero queries are sent" to LIST: all contexts.
    for q in &queries {
        let Some((namespace, leaf)) = q.split_once(':') else {
            put_error(out, option, NBD_REP_ERR_INVALID, "query lacks a namespace");
            return;
        };
        // "`base:` - the server MUST ignore this form during
        // `NBD_OPT_SET_META_CONTEXT`, and MUST support this as a wildcard during
        // `NBD_OPT_LIST_META_CONTEXT`"; unknown leaves and namespaces are ignored.
        if namespace == "base" && (leaf == "allocation" || (leaf.is_empty() && !set)) {
            found = true;
        }
    }
    if found {
        // "The metadata context ID in these replies is reserved and SHOULD be
        // set to zero" for LIST; SET hands out a real id.
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
        d.extend_from_slice(&id.to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        put_reply(out, option, NBD_REP_META_CONTEXT, &d);
        if set {
            *meta = Some(export.clone());
        }
    }
    put_reply(out, option, NBD_REP_ACK, &[]);
}

async fn write_out<W: AsyncWrite + Unpin>(w: &mut W, out: &[u8]) -> Result<(), ServeError> {
    w.write_all(out).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing_is_bounded() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Some(("abc".to_owned(), vec![NBD_INFO_NAME]))
        );
        // Name length pointing past the data, trailing bytes, truncation.
        let mut bad = d.clone();
        bad[3] = 200;
        assert_eq!(parse_info_request(&bad), None);
        let mut trailing = d.clone();
        trailing.push(0);
        assert_eq!(parse_info_request(&trailing), None);
        for n in 0..d.len() {
            assert_eq!(parse_info_request(&d[..n]), None);
        }
    }

    #[test]
    fn meta_request_parsing_is_bounded() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&u32::MAX.to_be_bytes()); // absurd query count
        assert_eq!(parse_meta_request(&d), None);
        let mut ok = Vec::new();
        ok.extend_from_slice(&0u32.to_be_bytes());
        ok.extend_from_slice(&1u32.to_be_bytes());
        ok.extend_from_slice(&5u32.to_be_bytes());
        ok.extend_from_slice(b"base:");
        assert_eq!(
            parse_meta_request(&ok),
            Some((String::new(), vec!["base:".to_owned()]))
        );
    }

    #[test]
    fn preferred_block_size_is_a_legal_power_of_two() {
        struct S(u32);
        #[async_trait::async_trait]
        impl BlockSource for S {
            fn size(&self) -> u64 {
                0
            }
            fn preferred_block_size(&self) -> u32 {
                self.0
            }
            async fn read(&self, _: u64, _: &mut [u8]) -> Result<(), crate::SourceError> {
                Ok(())
            }
        }
        assert_eq!(preferred_block_size(&S(0)), 512);
        assert_eq!(preferred_block_size(&S(4096)), 4096);
        assert_eq!(preferred_block_size(&S(5000)), 4096);
        assert_eq!(preferred_block_size(&S(u32::MAX)), MAX_PAYLOAD);
    }
}
