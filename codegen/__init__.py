"""The Triton back end (installed as `sparsedsl.codegen`): kernel plans and generated source."""
