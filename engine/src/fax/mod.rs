//! FAXお知らせメール (R-F1): received faxes from Kafka, notified by mail and kept for
//! the settings site.

pub mod document;

/// The largest record the engine writes (librdkafka's `message.max.bytes` of the
/// producers that may carry a fax: the state owner's and requests', the dead letters'):
/// 32 MiB, room for a fax record of up to 16 MiB and its document in base64 once more.
/// The topics they write need `max.message.bytes` at least as large for faxes that big
/// (README, "Fax records").
pub const MESSAGE_MAX_BYTES: &str = "33554432";

/// The largest document a fax record may carry, in base64: what the state topics take
/// once more besides the record (see [`MESSAGE_MAX_BYTES`]). A larger one is refused as
/// the record is decoded (a dead letter): kept, its write to the state would be refused
/// at every try, its mails never sent, and its partition's commits held for good.
pub const DOCUMENT_BASE64_AT_MOST: usize = 16 << 20;

/// The largest PDF a fax mail carries: 7 000 000 bytes, in base64 (lines of 76 and their
/// line ends) with the rest of the mail about 9.6 MB, under the 10 000 000 bytes a relay
/// commonly takes (Postfix's `message_size_limit` is 10 240 000). A larger fax is mailed
/// with its link only, and the mail says why: refused by the relay as too large (552),
/// it would reach nobody.
pub const ATTACHED_PDF_AT_MOST: usize = 7_000_000;
