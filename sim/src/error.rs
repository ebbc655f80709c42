//! EC2 API errors: a code from EC2's error vocabulary and a message, as the wire carries them.

use std::fmt;

use serde::Serialize;

/// An EC2 API error, rendered on the wire as EC2's error envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct ApiError {
    /// EC2 error code, e.g. `InvalidNetworkInterfaceID.NotFound`.
    pub code: String,
    /// Human-readable message in EC2's wording.
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// HTTP status EC2 uses for this code: 503 for throttling and unavailability, 500 for
    /// internal errors, 412 for `DryRunOperation`, 403 for
    /// authorization failures, 400 for every other client error.
    pub fn http_status(&self) -> u16 {
        match self.code.as_str() {
            "RequestLimitExceeded" | "Unavailable" | "ServiceUnavailable" => 503,
            "InternalError" | "InternalFailure" => 500,
            "DryRunOperation" => 412,
            "UnauthorizedOperation" | "AuthFailure" => 403,
            _ => 400,
        }
    }

    /// `MissingParameter` for a required parameter.
    pub fn missing(param: &str) -> Self {
        Self::new(
            "MissingParameter",
            format!("The request must contain the parameter {param}"),
        )
    }

    /// `InvalidParameterValue` for `param` = `value`.
    pub fn bad_value(param: &str, value: &str, why: &str) -> Self {
        Self::new(
            "InvalidParameterValue",
            format!("Value ({value}) for parameter {param} is invalid. {why}"),
        )
    }

    /// `InvalidParameterValue` with a free-form message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new("InvalidParameterValue", message)
    }

    /// `InvalidParameterCombination` with a free-form message.
    pub fn combination(message: impl Into<String>) -> Self {
        Self::new("InvalidParameterCombination", message)
    }

    /// `<kind>.NotFound`-style error for an id that does not exist, in EC2's wording.
    pub fn not_found(id: &str) -> Self {
        let (code, what) = match id_kind(id) {
            Some(IdKind::Vpc) => ("InvalidVpcID.NotFound", "vpc ID"),
            Some(IdKind::Subnet) => ("InvalidSubnetID.NotFound", "subnet ID"),
            Some(IdKind::SecurityGroup) => ("InvalidGroup.NotFound", "security group"),
            Some(IdKind::Instance) => ("InvalidInstanceID.NotFound", "instance ID"),
            Some(IdKind::Eni) => ("InvalidNetworkInterfaceID.NotFound", "networkInterface ID"),
            Some(IdKind::Attachment) => ("InvalidAttachmentID.NotFound", "attachment ID"),
            Some(IdKind::TrunkAssociation) => ("InvalidAssociationID.NotFound", "association ID"),
            None => ("InvalidID", "ID"),
        };
        Self::new(code, format!("The {what} '{id}' does not exist"))
    }

    /// `<kind>.Malformed` for an id whose syntax is wrong for `kind`.
    pub fn malformed(kind: IdKind, id: &str) -> Self {
        let code = match kind {
            IdKind::Vpc => "InvalidVpcID.Malformed",
            IdKind::Subnet => "InvalidSubnetID.Malformed",
            IdKind::SecurityGroup => "InvalidGroupId.Malformed",
            IdKind::Instance => "InvalidInstanceID.Malformed",
            IdKind::Eni => "InvalidNetworkInterfaceID.Malformed",
            IdKind::Attachment => "InvalidAttachmentID.Malformed",
            IdKind::TrunkAssociation => "InvalidAssociationID.Malformed",
        };
        Self::new(
            code,
            format!("Invalid id: \"{id}\" (expecting \"{}-...\")", kind.prefix()),
        )
    }
}

/// The kinds of resource id the simulator issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    /// `vpc-…`
    Vpc,
    /// `subnet-…`
    Subnet,
    /// `sg-…`
    SecurityGroup,
    /// `i-…`
    Instance,
    /// `eni-…`
    Eni,
    /// `eni-attach-…`
    Attachment,
    /// `trunk-assoc-…` (a branch ENI's association with a trunk ENI)
    TrunkAssociation,
}

impl IdKind {
    /// The id prefix (without the dash).
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Vpc => "vpc",
            Self::Subnet => "subnet",
            Self::SecurityGroup => "sg",
            Self::Instance => "i",
            Self::Eni => "eni",
            Self::Attachment => "eni-attach",
            Self::TrunkAssociation => "trunk-assoc",
        }
    }
}

/// The kind of a syntactically valid id (prefix, dash, 8 or 17 lowercase hex digits).
pub fn id_kind(id: &str) -> Option<IdKind> {
    let (kind, rest) = if let Some(r) = id.strip_prefix("eni-attach-") {
        (IdKind::Attachment, r)
    } else if let Some(r) = id.strip_prefix("trunk-assoc-") {
        (IdKind::TrunkAssociation, r)
    } else {
        let (p, r) = id.split_once('-')?;
        let k = match p {
            "vpc" => IdKind::Vpc,
            "subnet" => IdKind::Subnet,
            "sg" => IdKind::SecurityGroup,
            "i" => IdKind::Instance,
            "eni" => IdKind::Eni,
            _ => return None,
        };
        (k, r)
    };
    let hex = rest
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex && (rest.len() == 8 || rest.len() == 17)).then_some(kind)
}

/// Checks that `id` is a well-formed id of `kind`.
pub fn check_id(kind: IdKind, id: &str) -> Result<(), ApiError> {
    if id_kind(id) == Some(kind) {
        Ok(())
    } else {
        Err(ApiError::malformed(kind, id))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_classified_by_prefix_and_hex_body() {
        assert_eq!(id_kind("eni-0123456789abcdef0"), Some(IdKind::Eni));
        assert_eq!(
            id_kind("eni-attach-0123456789abcdef0"),
            Some(IdKind::Attachment)
        );
        assert_eq!(id_kind("i-12345678"), Some(IdKind::Instance));
        assert_eq!(
            id_kind("trunk-assoc-0123456789abcdef0"),
            Some(IdKind::TrunkAssociation)
        );
        assert_eq!(id_kind("eni-xyz"), None);
        assert_eq!(id_kind("eni-0123456789ABCDEF0"), None);
        assert_eq!(id_kind("foo-12345678"), None);
    }

    #[test]
    fn not_found_messages_quote_the_id_as_ipamd_parses_it() {
        let e = ApiError::not_found("eni-0123456789abcdef0");
        assert_eq!(e.code, "InvalidNetworkInterfaceID.NotFound");
        assert!(e.message.contains("'eni-0123456789abcdef0'"));
        assert_eq!(e.http_status(), 400);
        assert_eq!(
            ApiError::new("RequestLimitExceeded", "x").http_status(),
            503
        );
    }
}
