"""Topic-based Subscriptions (HL7 Subscriptions R5 Backport IG STU 1.1) for records.

- topics.py: the topics offered and the write transitions that trigger them.
- outbox.py: the event a triggering write records in its own transaction (called by store.py).
"""
