"""One module per API surface: each only translates shapes to and from the request core."""
