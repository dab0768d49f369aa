//! Data structures of the session store that need no nginx. The glue keeps their memory in nginx
//! shared memory and calls them with the zone's mutex held.

pub mod index;
