"""Psychotherapy notes as the legal record: draft, sign, lock, addenda, corrections,
entered-in-error and co-signature, by the same rules as records' progress notes
(mindchart_core.note_lifecycle), inside the vault (notes sealed, reads consent-gated).

- `keys.py`: psychnotes' own document-signing key and its published JWK Set.
- `service.py`: `$sign` (with the JWS Provenance), `$entered-in-error`, `$verify-signature`, and
  the check an addendum or a correction meets when it is written.
- `routes.py`: their HTTP handlers and the JWK Set route.

No amendment requests here: a psychotherapy note is outside the right of access (45 CFR
164.524(a)(1)(i)), and 164.526(a)(2)(iii) lets a covered entity deny a request to amend what
"would not be available for inspection under § 164.524". Records has the amendment requests of
progress notes; psychnotes has no route for them.
"""
