//! Every way a byte stream can break the MQTT rules, one variant per rule, so the broker can log
//! exactly what happened and pick the 5.0 reason code it sends before closing.

use super::ReasonCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("variable byte integer longer than 4 bytes or not minimally encoded [MQTT-1.5.5-1]")]
    MalformedVarInt,
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    PacketTooLarge { size: usize, max: usize },
    #[error("reserved packet type {0} [MQTT-2.1.3]")]
    ReservedPacketType(u8),
    #[error("invalid fixed header flags {flags:#06b} for packet type {packet_type} [MQTT-2.2.2-2]")]
    InvalidFlags { packet_type: u8, flags: u8 },
    #[error("PUBLISH with QoS 3 [MQTT-3.3.1-4]")]
    InvalidQoS,
    #[error("topic alias 0 [MQTT-3.3.2-8]")]
    ZeroTopicAlias,
    #[error("DUP flag set on a QoS 0 PUBLISH [MQTT-3.3.1-2]")]
    DupOnQoS0,
    #[error("a field runs past the end of the packet")]
    Truncated,
    #[error("bytes left over after the last field of the packet")]
    TrailingBytes,
    #[error("string is not well-formed UTF-8 [MQTT-1.5.3-1]")]
    InvalidUtf8,
    #[error("string contains U+0000 [MQTT-1.5.3-2]")]
    NullCharacter,
    #[error("wildcard character in a PUBLISH topic name [MQTT-3.3.2-2]")]
    WildcardInTopicName,
    #[error("zero-length topic name [MQTT-4.7.3-1]")]
    EmptyTopicName,
    #[error("packet identifier 0 [MQTT-2.3.1-1]")]
    ZeroPacketId,
    #[error("SUBSCRIBE without a topic filter [MQTT-3.8.3-3]")]
    NoSubscribeFilters,
    #[error("UNSUBSCRIBE without a topic filter [MQTT-3.10.3-2]")]
    NoUnsubscribeFilters,
    #[error("SUBACK without a return code [MQTT-3.9.3-1]")]
    NoSubAckCodes,
    #[error("protocol name is not \"MQTT\" or \"MQIsdp\" [MQTT-3.1.2-1]")]
    InvalidProtocolName,
    #[error("unsupported protocol level {0} [MQTT-3.1.2-2]")]
    UnsupportedProtocolLevel(u8),
    #[error("CONNECT reserved flag is set [MQTT-3.1.2-3]")]
    ConnectReservedFlag,
    #[error("will QoS or will retain set without the will flag [MQTT-3.1.2-11]")]
    WillFlagsWithoutWill,
    #[error("will QoS 3 [MQTT-3.1.2-14]")]
    InvalidWillQoS,
    #[error("password flag set without the user name flag [MQTT-3.1.2-22]")]
    PasswordWithoutUsername,
    #[error("reserved bits set in CONNACK acknowledge flags [MQTT-3.2.2-1]")]
    ConnAckReservedFlags,
    #[error("reserved bits set in subscription options [MQTT-3.8.3-4]/[MQTT-3.8.3-5]")]
    SubscriptionOptionsReserved,
    #[error("QoS 3 requested in SUBSCRIBE [MQTT-3.8.3-4]")]
    InvalidSubscribeQoS,
    #[error("retain handling 3 in subscription options [MQTT-3.8.3-5]")]
    InvalidRetainHandling,
    #[error("reason code {code:#04x} is not allowed in {packet}")]
    InvalidReasonCode { packet: &'static str, code: u8 },
    #[error("unknown property identifier {0:#04x} [MQTT-2.2.2]")]
    UnknownProperty(u8),
    #[error("property {id:#04x} is not allowed in {packet} [MQTT-2.2.2]")]
    PropertyNotAllowed { id: u8, packet: &'static str },
    #[error("property {0:#04x} included more than once [MQTT-2.2.2]")]
    DuplicateProperty(u8),
    #[error("invalid value for property {0:#04x}")]
    InvalidPropertyValue(u8),
    #[error("the first packet is not CONNECT [MQTT-3.1.0-1]")]
    ExpectedConnect,
    #[error("zero-length topic name without a topic alias [MQTT-3.3.2-1]")]
    EmptyTopicWithoutAlias,
}

impl DecodeError {
    /// The MQTT 5.0 reason code a server sends (CONNACK or DISCONNECT) for this error.
    pub fn reason_code(&self) -> ReasonCode {
        use DecodeError::*;
        match self {
            PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            UnsupportedProtocolLevel(_) | InvalidProtocolName => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            WildcardInTopicName | EmptyTopicName => ReasonCode::TOPIC_NAME_INVALID,
            // [MQTT-3.3.2-8]: the receiver of an alias of 0 disconnects with 0x94.
            ZeroTopicAlias => ReasonCode::TOPIC_ALIAS_INVALID,
            DuplicateProperty(_)
            | InvalidPropertyValue(_)
            | InvalidRetainHandling
            | ExpectedConnect
            | EmptyTopicWithoutAlias
            | ZeroPacketId => ReasonCode::PROTOCOL_ERROR,
            _ => ReasonCode::MALFORMED_PACKET,
        }
    }
}
