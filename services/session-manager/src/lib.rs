//! capsa-session-manager (under construction).
