"""What psychnotes says about itself: its CapabilityStatement (`GET [base]/metadata`) and the
OperationDefinitions of its operations (`GET [base]/OperationDefinition/{id}`).

FHIR R4 http.html#capabilities: "Applications SHALL return a resource that describes the
functionality of the server end-point", at `GET [base]/metadata`.

- `operations.py`: one OperationDefinition per operation route, with its parameters.
- `statement.py`: the CapabilityStatement, built from the app's own route table when the app is
  created (so it cannot drift from what is served: a route it cannot classify, or an operation
  route without an OperationDefinition, stops the service from starting).
- `routes.py`: the two public routes. Public like records' /metadata and the SMART discovery
  document: a client reads them before it has a token, and they hold no patient data.
"""
