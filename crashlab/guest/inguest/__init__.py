"""Everything that runs inside a guest (the host imports only `init`, for the /init text and paths)."""
