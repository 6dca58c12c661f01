"""The Lua scripts of the ledger, shipped inside the package as ``app.lua``."""
