"""Patients' amendment requests (45 CFR 164.526), built on FHIR R4 `Task` and the note lifecycle.

- `requests.py`: the Task records stores for a request, and what each step changes in it.
- `appended.py`: the statement of disagreement and the rebuttal appended to the note, and how
  they travel with every later disclosure of it (read, search, $everything, $export, CDex).
- `store.py`: the marker on a note's stored document naming what is appended to it, so reads
  of notes with nothing appended ask the datastore nothing more; its one-time backfill.
- `service.py`: the steps (file, deny, extend, disagree, rebut; completion when the author signs
  a correction), each in one transaction.
- `routes.py`: their HTTP handlers, OperationDefinitions and CapabilityStatement entries.

Nothing is imported here: records/lifecycle/rules.py (imported by the store) uses `requests`.
"""
