-- Orthanc auto-routing to cxr-node: every stored chest radiograph (CR or DX) is sent to the DicomModalities
-- entry named below. The node's own results (Manufacturer "cxr-node", SeriesDescription starting "AI", or
-- anything the node itself sent) are never routed back to it, so there is no loop.
-- Install: "LuaScripts": ["/etc/orthanc/autoroute.lua"] in Orthanc's configuration.

local NODE_MODALITY = 'cxr-node'  -- the key of the node in "DicomModalities"
local NODE_AET = 'CXR_NODE'       -- the node's AE title (its results arrive from it)
local ROUTED_MODALITIES = { CR = true, DX = true }

local function IsNodeOutput(tags, origin)
   local manufacturer = tags['Manufacturer'] or ''
   local description = tags['SeriesDescription'] or ''
   return manufacturer == 'cxr-node'
      or string.sub(description, 1, 2) == 'AI'
      or (origin ~= nil and origin['RemoteAet'] == NODE_AET)
end

function OnStoredInstance(instanceId, tags, metadata, origin)
   if origin ~= nil and origin['RequestOrigin'] == 'Lua' then
      return  -- stored by a Lua script: not a new acquisition
   end
   if not ROUTED_MODALITIES[tags['Modality'] or ''] or IsNodeOutput(tags, origin) then
      return
   end
   print('cxr-node autoroute: sending ' .. instanceId .. ' (' .. tags['Modality'] .. ') to ' .. NODE_MODALITY)
   SendToModality(instanceId, NODE_MODALITY)
end
