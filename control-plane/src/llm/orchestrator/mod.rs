//! The LLM orchestrator: server-side tools over the organisation's plant data and documents,
//! the function-calling loop that lets a model use them, and the hybrid mode that fans a
//! question out to the data and to several models and combines their answers.
//!
//! Entry points: `/v1/query` with `mode: "hybrid"`, and `/v1/chat/completions` with the model
//! alias `llm.orchestrator.alias` (default `kip-hybrid`), both in [`crate::llm::api`].
//!
//! Invariants:
//! - The organisation is always the caller's (from its API key); tools take none from the
//!   model ([`tools`]).
//! - Every model call goes through the gateway ([`crate::llm::Gateway::complete`]): limits,
//!   budget and metering apply exactly as to direct calls.
//! - Steps, tool calls, tokens, wall time and tool result sizes are bounded
//!   ([`config::LoopLimits`]); every model tool call is traced and stored (`llm_tool_calls`).

pub mod config;
pub mod hybrid;
pub mod sources;
pub mod tool_loop;
pub mod tools;
