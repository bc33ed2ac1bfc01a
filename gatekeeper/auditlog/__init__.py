"""The audit log, one concept in one place: every access and every change is a record
in a hash chain (`chain`), whose end is also kept outside the database (`head`), so
an edit, a deletion, a reordering or a cut tail shows; `check` says which record was
touched, `read` shows the records. The store appends them (gatekeeper.store, inside
each change's own transaction). docs/design.md, "The store", has the rules.

This file imports none of its modules: the forced command loads only `chain` and
`head`, on every connection.
"""
