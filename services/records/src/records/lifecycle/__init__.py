"""Progress notes as the legal record: draft, sign, lock (and, built on them, addenda,
corrections, entered-in-error, co-signature and amendment requests).

- `rules.py`: the lock every plain write meets inside the store (no route can bypass it); the
  rules psychnotes follows too (what locks, addenda and corrections, co-signature, the signature
  Provenance) are in mindchart_core.note_lifecycle.
- `keys.py`: records' own document-signing key and its published JWK Set.
- `service.py`: the operations (`$sign`, `$verify-signature`), each in one transaction.
- `routes.py`: their HTTP handlers, the OperationDefinitions and `install`/`declare` for app.py.

This package imports nothing from records at import time beyond what `rules.py` needs, because
records/store.py imports `rules` (the store is where the lock lives).
"""
