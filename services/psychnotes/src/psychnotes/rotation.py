"""KEK rotation: re-wrap every data key under the current KEK, never decrypting a note.

Procedure: create a new KEK (`mindchart psychnotes new-kek`);
restart psychnotes with `KEK_FILE` = the new one and `PREVIOUS_KEK_FILES` = the old one (new writes
use the new KEK, old notes still open); run `mindchart psychnotes rotate-key --new-kek-file NEW`;
then drop `PREVIOUS_KEK_FILES` and destroy the old KEK. Re-running is harmless: only data keys not
yet under the new KEK are touched, each with a compare-and-set on the KEK id it was read with.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from psychnotes import store, vault
from psychnotes.keys import Keyring

_TYPES = {"notes": "DocumentReference", "notes_history": "DocumentReference",
          "consents": "Consent", "consents_history": "Consent", "provenances": "Provenance"}


def binding_of(collection: str, doc: dict[str, Any]) -> vault.Binding:
    resource_id = doc["id"] if collection.endswith("_history") else doc["_id"]
    return vault.Binding(_TYPES[collection], str(resource_id), int(doc["vid"]), str(doc["patient"]))


async def rewrap_all(db: store.Db, keyring: Keyring) -> dict[str, Any]:
    rewrapped: Counter[str] = Counter()
    missing: Counter[str] = Counter()
    for collection in store.SEALED_COLLECTIONS:
        async for doc in store.sealed_documents(db, collection, keyring.current_id):
            old = str(doc["sealed"]["dek"]["kek"])
            if old not in keyring.keks:
                missing[old] += 1
                continue
            sealed = vault.rewrap(keyring, doc["sealed"], binding_of(collection, doc))
            if sealed is not None and await store.set_sealed(db, collection, doc["_id"], old, sealed):
                rewrapped[collection] += 1
    return {"kek": keyring.current_id, "rewrapped": dict(rewrapped),
            "not_rewrapped_unknown_kek": dict(missing)}
