//! Helpers for kip's end-to-end tests (real PostgreSQL, Mosquitto, OPC UA peers).
