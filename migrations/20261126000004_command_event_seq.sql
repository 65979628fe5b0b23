-- Command log rows keyed by each change's place in its command's log (seq,
-- from 1, carried in stream:commands) instead of (status, at), so that two
-- changes with the same status in the same millisecond stay two rows. Rows
-- archived before this carry no seq and keep their old key. NULL seqs never
-- conflict in the unique index, which also serves lookups by command.
ALTER TABLE command_events ADD COLUMN seq integer;
ALTER TABLE command_events DROP CONSTRAINT command_events_pkey;
CREATE UNIQUE INDEX command_events_seq_key ON command_events (command_id, seq);
CREATE UNIQUE INDEX command_events_unsequenced_key ON command_events (command_id, status, at)
    WHERE seq IS NULL;
