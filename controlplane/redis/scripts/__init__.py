"""One typed function per Lua script of `controlplane/redis/lua/`, and the one way to send it.

Each function takes named arguments (and a `Keys`), builds the script's KEYS and ARGV as its
header in `lua/` documents them, and returns a `Call` whose `parse` turns the reply into a
typed result. Production code and the contract tests call the same functions, so the tests
test the contract the code uses. `call.py` holds the EVALSHA and its NOSCRIPT fallback;
`jobs`, `kernels`, `bus` and `metrics` hold the scripts, one module per side that uses them.
"""
