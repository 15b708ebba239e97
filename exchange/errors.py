"""The exceptions `exchange` raises, each with an exit code and a hint.

Every error an operator can meet derives from :class:`ExchangeError`. The CLI
prints ``message`` and ``hint`` and exits with ``exit_code``; no traceback for
an expected problem. Third-party errors (paramiko, pyarrow, cryptography) are
translated at the boundary with ``raise ... from exc``. Code decides by an
error's class (or its attributes), never by its message text; a class defined
beside the code that raises it still appears in this tree.

    ExchangeError (1)
    ├── ConfigError (3)            exchange.toml, node home, peers
    │   ├── KeyPermissionError (3) private key readable by others
    │   ├── NodeIdError (3)        a node id not of the accepted form (init, peer add, exchange.toml)
    │   └── PeerKeyError (3)       a peer's signing key or age recipient that does not parse (peer add)
    ├── BundleError (10)           anything wrong with a bundle or ack file
    │   ├── FormatError (11)       malformed: not a tar, bad JSON, bad member
    │   │   └── NotRegularFileError (17) a link, folder, FIFO, socket or device named like a file
    │   ├── LimitError (12)        a size/count limit exceeded before crypto
    │   ├── AuthenticityError (13) signature, hash, MAC or chain does not verify
    │   ├── NotForUsError (14)     addressed to another node
    │   └── VersionError (15)      unknown or incompatible format/app version
    │       └── HeldError (15)     another major version: kept, applied after an upgrade (wire.bundle)
    ├── CryptoError (16)           age / SSHSIG primitive failure (decrypt, key)
    │   └── NoIdentityError (16)   no identity of this node opens the file (not encrypted to it)
    ├── StreamError (20)           stream order: replay, gap, fork
    ├── ApplyError (21)            a document or bundle could not be applied
    │   ├── OwnershipError (22)    a peer wrote what it does not own or did not announce
    │   └── SchemaChangeError (23) a peer's schema change that is not additive: the bundle is HELD
    ├── ConflictError (24)         no such conflict, or it is not OPEN (exchange conflicts resolve)
    ├── TransportError (30)        moving files failed
    │   ├── HostKeyError (30)      the server's host key is not the pinned one (transport.sftp.address)
    │   └── TransientTransportError (31)  worth retrying (timeout, reset)
    │       └── FileChanged (31)   a remote file changed while read: list again (transport.sftp.session)
    ├── DatabaseError (40)         the node database is unreachable or wrong
    └── BusyError (50)             another exchange process holds the lock

:data:`EXIT_CODES` is the one table of what an exit status means (``exchange --help`` prints it,
docs/SERVICE.md copies it, a test compares them). A sync, import or stick visit that finished but
quarantined a file, left a bundle FAILED or HELD, or got a REJECTED ack, exits non-zero too
(:func:`outcome_exit_code`), so cron and systemd see it.
"""

from __future__ import annotations

from collections.abc import Iterable

from exchange.vocabulary import Outcome


class ExchangeError(Exception):
    """Base of every error `exchange` raises on purpose."""

    exit_code = 1
    hint = ""
    transient = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(ExchangeError):
    exit_code = 3
    hint = "Check exchange.toml in the node home (see `exchange init --help`)."


class KeyPermissionError(ConfigError):
    hint = "Restrict the file to its owner: chmod 600 <file>."


class NodeIdError(ConfigError):
    """A node id that is not 1-32 of a-z, 0-9 and '-': refused where it is entered, never quarantined."""

    hint = ("A node id is 1 to 32 characters of a-z, 0-9 and '-', starting with a letter or digit, "
            "e.g. ho or s001; use the same id in every command.")


class PeerKeyError(ConfigError):
    """A peer's signing key or age recipient, as pasted into `peer add`, that does not parse."""

    hint = ("Copy it again from the peer's `exchange identity`: the signing key is the whole "
            "\"ssh-ed25519 AAAA...\" line in quotes, the recipient is age1 followed by 58 letters and digits.")


class BundleError(ExchangeError):
    exit_code = 10
    hint = "The file was set aside in quarantine/; ask the sender to resend it."


class FormatError(BundleError):
    exit_code = 11


class LimitError(BundleError):
    exit_code = 12


class AuthenticityError(BundleError):
    exit_code = 13
    hint = ("The file is not what its sender signed, or the sender is not trusted. "
            "Do not apply it; check the peer's key with `exchange peer list`.")


class NotForUsError(BundleError):
    exit_code = 14
    hint = "The file is addressed to another node; deliver it there instead."


class VersionError(BundleError):
    exit_code = 15
    hint = "Both sides must run the same major version of exchange: upgrade the older one."


class NotRegularFileError(FormatError):
    """A link, folder, FIFO, socket or device where a file was expected: never opened or followed."""

    exit_code = 17
    hint = ("Something other than a regular file sits under that name, in a folder someone else can "
            "write to (a stick, a drop folder, an SFTP account): it was not opened, followed or deleted. "
            "Find out who put it there, then remove it.")


class CryptoError(ExchangeError):
    exit_code = 16
    hint = "Check that the right identity (key) file is used."


class NoIdentityError(CryptoError):
    """None of the identities given opens the file: it is encrypted to other nodes only."""

    hint = "The file is not encrypted to this node's key: check who it was sent to, and the identity file used."


class StreamError(ExchangeError):
    exit_code = 20


class ApplyError(ExchangeError):
    exit_code = 21
    hint = "Fix the cause, then run `exchange retry`."


class OwnershipError(ApplyError):
    """A genuine peer's bundle writes a document it does not own, or rows it did not announce."""

    exit_code = 22
    hint = ("Nothing of the bundle was applied and the sender got a REJECTED ack. A store may only send its "
            "own documents: check that store's machine and catalog (owner_columns) before anything else; "
            "see docs/SECURITY.md.")


class SchemaChangeError(ApplyError):
    """A bundle's schema differs from this node's in a way that is not additive (a column's type, a key).

    Detected before anything of the bundle is applied; the bundle is HELD (no ack), the stream waits
    behind it, and it is applied at the next import once this node's schema has the sender's.
    """

    exit_code = 23
    hint = ("Bring both sides to the same catalog version (`exchange catalog diff --peer PEER` shows what "
            "differs; `exchange migrate` on the older side), then run `exchange retry`.")


class ConflictError(ExchangeError):
    """A conflict that does not exist or is no longer open was asked to be resolved."""

    exit_code = 24
    hint = "List the open conflicts with `exchange conflicts list --open`."


class TransportError(ExchangeError):
    exit_code = 30
    hint = "Check the peer's address and credentials with `exchange doctor`."


class TransientTransportError(TransportError):
    exit_code = 31
    transient = True
    hint = "The link failed; the next sync retries automatically."


class DatabaseError(ExchangeError):
    exit_code = 40
    hint = "Check the database URL in exchange.toml and that the database is running."


class BusyError(ExchangeError):
    exit_code = 50
    hint = "Another exchange process is running on this home; wait for it or stop it."


#: Exit status -> what it means, for an operator reading a cron mail. Every ``exit_code`` of the tree is here.
EXIT_CODES: dict[int, str] = {
    0: "done: nothing went wrong",
    1: "an unexpected error, or `doctor`/`demo` found a problem",
    2: "wrong command line (unknown option, missing value)",
    3: "configuration: exchange.toml, the node home, peers or key file modes",
    10: "a bad file: quarantined (see `exchange status received`)",
    11: "a bad file: malformed",
    12: "a bad file: over a size or count limit",
    13: "a bad file: signature, hash or chain does not verify",
    14: "a file addressed to another node",
    15: "another major version: HELD until this node is upgraded",
    16: "decryption or key failure",
    17: "not a regular file (a link, FIFO, folder) where a file was expected",
    20: "stream order: replay, gap or fork",
    21: "a bundle FAILED here or was REJECTED by the peer: `exchange retry`",
    22: "a peer wrote documents it does not own (its bundle was rejected)",
    23: "a peer's schema change that is not additive (`exchange catalog diff`)",
    24: "no such conflict, or it is not OPEN (`exchange conflicts list`)",
    30: "transport failed: address, login or host key (`exchange doctor`)",
    31: "transport failed for now (timeout, refused, reset): retried next sync",
    40: "the node database is unreachable or wrong",
    50: "busy: another exchange process holds this home",
    130: "interrupted (Ctrl-C): nothing is lost, running it again is safe",
}

#: The exit status of a command stopped by Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED = 130

#: A finished cycle's file outcomes that need an operator, most urgent first, with their exit status.
_OUTCOME_EXITS = ((Outcome.QUARANTINED, BundleError.exit_code), (Outcome.FAILED, ApplyError.exit_code),
                  (Outcome.REJECTED, ApplyError.exit_code), (Outcome.HELD, VersionError.exit_code))


def outcome_exit_code(outcomes: Iterable[str], failures: Iterable[BaseException] = (), *,
                      other_errors: bool = False) -> int:
    """The exit status of a cycle that ran to its end: 0 only when no file and no transfer went wrong.

    A quarantined file comes first (10), then a FAILED bundle or a REJECTED ack (21), a HELD bundle (15),
    then transport: 30 when any failure is not worth retrying, 31 when all are transient;
    ``other_errors`` (a refused entry, no failure object) is 30.
    """
    seen = set(outcomes)
    for status, code in _OUTCOME_EXITS:
        if status in seen:
            return code
    failed = list(failures)
    permanent = [f for f in failed if not (isinstance(f, ExchangeError) and f.transient)]
    if permanent:
        return max((f.exit_code for f in permanent if isinstance(f, ExchangeError)), default=TransportError.exit_code)
    if other_errors:
        return TransportError.exit_code
    return TransientTransportError.exit_code if failed else 0
