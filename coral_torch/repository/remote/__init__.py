"""Repository push/pull to an S3 remote: objects, then commits, then refs.

Remote layout under the S3 prefix (objects as in :mod:`coral_torch.storage.s3.objects`)::

    weights/<hash>, deltas/<hash>, metadata/<hash>[.delta].json   content-addressed objects
    commits/<commit id>.json                                      a commit: manifest and metadata
    refs/<ref name>.json                                          {"kind": "ref", "name": <ref name>,
                                                                   "commit": id, "updated": time}

Every document carries its own checksum (``doc_xxh3``, see :func:`~coral_torch.format.documents.
encode_document`); a commit document is also checked against its id (the xxh3-128 of its manifest)
and its object list against the manifest. Nothing damaged is ever stored: a pull refuses a damaged
or forged document before it writes anything, and an object whose bytes fail their checks is
never written.

Ordering makes readers safe: a commit document is written only after every object it needs is on
the remote and verified, and a ref only after its commit document, so no reader ever sees a ref
whose objects are missing. Objects and commits are content-addressed, so two machines pushing to one
prefix never overwrite each other's commits; for a ref both moved, the newer update wins, and the
other commit stays on the remote (``pull`` fetches every commit and keeps the ones no ref names under
``keep/``). An interrupted push or pull is finished by running it again; nothing already transferred
and intact is sent again.

What a push verifies: every upload (the server's ETag against the MD5 of what was sent, see
:mod:`~coral_torch.storage.s3.client`); the documents already on the remote, by comparing the listed
ETag with the MD5 of the document this repository would write (a document that differs is read and
checked: damaged ones are written again, intact ones of another machine are kept); and, for every
commit whose document or ref it is about to write, every object that commit needs (its metadata and
the payload's listed size and ETag), uploading damaged ones again. ``push(verify=True)`` checks every
object of every pushed commit. Damage done on the server after a commit was published is found by
``pull`` (which refuses it) and repaired by ``push(verify=True)``.

Names: every ref name (local ones before a push sends anything, remote ones before a pull stores
anything) and every run name goes through :mod:`coral_torch.refnames`; no key is built from a name
that could leave the prefix.

Modules: :mod:`.protocol` (layout, document checks, opening a remote), :mod:`.pushing`,
:mod:`.pulling`, :mod:`.publish` (compare-and-swap publishing of commits and refs for several writers
sharing one prefix), :mod:`.collect` (garbage collection: commits no ref names and the objects only
they needed). Objects move through the sync engine (:mod:`coral_torch.storage.s3.sync`): a push
from the repository's packs (:class:`~.pushing.RepositoryObjects`) to the remote, a pull from the
remote into one new pack (:class:`~.pulling.PackSink`, written by
:class:`~coral_torch.repository.packs.PackWriter`).
"""

from __future__ import annotations

from .collect import collect_garbage
from .protocol import RemoteLike
from .publish import RemoteRef, conditional_writes, move_ref, publish_commit, read_ref
from .pulling import fetch_objects, pull, require_remote_repository
from .pushing import Repository, push

__all__ = [
    "push",
    "pull",
    "fetch_objects",
    "require_remote_repository",
    "RemoteLike",
    "Repository",
    "RemoteRef",
    "read_ref",
    "conditional_writes",
    "publish_commit",
    "move_ref",
    "collect_garbage",
]
