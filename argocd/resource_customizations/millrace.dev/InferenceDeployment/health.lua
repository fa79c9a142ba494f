-- Argo CD health of a millrace.dev InferenceDeployment, from the conditions the operator
-- writes (Lua 5.1, as Argo CD runs it). In order:
--   not yet observed (no status, or observedGeneration behind) -> Progressing
--   Degraded=True (invalid spec, failed apply)                  -> Degraded
--   Ready=True, BatchSucceeded=False (last batch not published)  -> Degraded
--   Ready=True, spec.batch.suspend                               -> Suspended
--   Ready=True                                                   -> Healthy
--   otherwise (scorers rolling out, Progressing=True or not)     -> Progressing
local hs = {}

local function condition(conditions, kind)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function says(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Millrace operator to reconcile this resource"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = status.conditions
local degraded = condition(conditions, "Degraded")
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = says(degraded, "The operator reports the resource as degraded")
  return hs
end

local ready = condition(conditions, "Ready")
if ready ~= nil and ready.status == "True" then
  local batch = condition(conditions, "BatchSucceeded")
  if batch ~= nil and batch.status == "False" then
    hs.status = "Degraded"
    hs.message = says(batch, "The last batch run was not published")
    return hs
  end
  if obj.spec ~= nil and obj.spec.batch ~= nil and obj.spec.batch.suspend == true then
    hs.status = "Suspended"
    hs.message = "Scorers are serving; the batch precompute is suspended (spec.batch.suspend)"
    return hs
  end
  hs.status = "Healthy"
  hs.message = says(ready, "Scorers are available")
  return hs
end

local progressing = condition(conditions, "Progressing")
hs.status = "Progressing"
hs.message = says(progressing, says(ready, "Waiting for the scorers to become available"))
return hs
