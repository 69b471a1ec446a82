"""The mail model plugins see: Connection, Transaction, Address, Header, Received, DSN, spool."""
