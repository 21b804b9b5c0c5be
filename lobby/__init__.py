"""krmx-lobby: an event-sourced Krmx lobby server and client."""
