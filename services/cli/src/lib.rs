//! capsa-cli (under construction).
