//! Memory API (see DESIGN.md).
