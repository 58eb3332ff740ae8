-- A thread's state is written only by a capture at least as new as the one
-- that wrote it last: a capture flushed late (after a store outage) cannot
-- roll the state back.
ALTER TABLE tether_threads ADD COLUMN state_seq BIGINT NOT NULL DEFAULT 0;
