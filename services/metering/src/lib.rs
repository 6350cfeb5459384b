//! capsa-metering (under construction).
