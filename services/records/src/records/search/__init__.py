"""FHIR search: values extracted at write time (`extract`) and queries over them (`query`)."""
